"""Helpers of the serving benchmarks: a `moemesh serve` process and streaming completions."""
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Serve:
    def __init__(self, binary, model, *args):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "serve", "--model", model, "--port", str(self.port), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError("moemesh serve did not become healthy")
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request("GET", "/v1/models")
        self.model_id = json.loads(c.getresponse().read())["data"][0]["id"]

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


def one_stream(port, model_id, prompt, tokens, out, i):
    """Streams one greedy completion of `tokens` tokens; out[i] = the arrival times of its tokens
    (prompt: text, or a list of token ids)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = json.dumps({"model": model_id, "prompt": prompt, "max_tokens": tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True})
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    times = []
    for line in r:
        line = line.decode().strip()
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event["choices"] and event["choices"][0].get("text"):
                times.append(time.perf_counter())
    out[i] = times


def run_streams(server, prompts, tokens):
    """One streaming completion per prompt, all at once; returns the start time and, per prompt,
    the arrival times of its tokens. Raises when a stream failed."""
    out = {}
    threads = [threading.Thread(target=one_stream,
                                args=(server.port, server.model_id, p, tokens, out, i))
               for i, p in enumerate(prompts)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(out) != len(prompts):
        raise RuntimeError(f"{len(prompts) - len(out)} of {len(prompts)} streams failed")
    return start, out
