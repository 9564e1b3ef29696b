#!/usr/bin/env python3
"""Soak test: N concurrent streaming clients against `moemesh serve` (a cluster with 2 expert
workers by default) for a fixed time, watching every role process for leaks.

Every --interval seconds it samples, for serve's own process and every member that
/admin/cluster lists (by pid): the resident set size and the number of open file descriptors
(/proc/PID/status, /proc/PID/fd), plus the cluster's KV cache usage and running/waiting requests
(/admin/cluster "engine"). After the run the clients stop and the cluster must go idle.

It fails (exit 1) when, for any process,
  - the RSS after the warm-up grows by more than max(--rss-bound-pct % of its RSS at the end of the
    warm-up, --rss-bound-mib MiB), comparing the end of the warm-up with the last sample under
    load and with the idle sample,
  - the number of open file descriptors when idle is above the number at the end of the warm-up
    (the clients' own connections are closed by then),
  - the data-plane (UCX) buffers it allocated (/admin/experts: each expert worker's
    buffers_total, and the attention workers' dispatch.buffers_total) grow by more than
    --buffer-bound after the warm-up (the pools keep their high-water mark: flat in steady state),
or when the KV cache usage does not return to 0 within --idle-timeout seconds of the clients
stopping, or when a request failed.

Usage: bench/soak.py [--clients 16] [--seconds 120] [--binary build/bin/moemesh] [--model DIR]
"""
import argparse
import http.client
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def get_json(port, path, timeout=10):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def proc_figures(pid):
    """(rss bytes, open fds) of a process, or None when it is gone."""
    try:
        rss = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


class Clients:
    """N threads, each streaming completions back to back over its own keep-alive connection."""

    def __init__(self, port, model, n, max_tokens, seed):
        self.port, self.model, self.max_tokens = port, model, max_tokens
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.requests = self.tokens = 0
        self.errors = []
        self.threads = [threading.Thread(target=self.run, args=(seed + i,), daemon=True)
                        for i in range(n)]

    def start(self):
        for t in self.threads:
            t.start()

    def join(self):
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def run(self, seed):
        rng = random.Random(seed)
        conn = None
        while not self.stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            prompt = [rng.randrange(3, 6000) for _ in range(rng.randrange(4, 200))]
            body = json.dumps({"model": self.model, "prompt": prompt, "stream": True,
                               "max_tokens": rng.randrange(1, self.max_tokens + 1),
                               "temperature": 0.8, "seed": rng.randrange(1 << 30),
                               "ignore_eos": True})
            tokens = 0
            try:
                conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
                for line in resp:
                    if line.startswith(b"data: {"):
                        if b'"error"' in line:
                            raise RuntimeError(line[:300].decode(errors="replace"))
                        tokens += 1
                with self.lock:
                    self.requests += 1
                    self.tokens += tokens
            except Exception as e:  # noqa: BLE001 - every failure is reported
                with self.lock:
                    self.errors.append(repr(e))
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(ROOT, "build", "bin", "moemesh"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "demo"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=120, help="time under load, warm-up included")
    ap.add_argument("--warmup", type=float, default=30)
    ap.add_argument("--interval", type=float, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--expert-workers", type=int, default=2)
    ap.add_argument("--kv-cache-gib", type=float, default=0.25,
                    help="KV pool of the attention worker: its pages are first touched as the "
                    "block allocator cycles through free blocks, so the pool must be small "
                    "enough to be touched in full during the warm-up (0.25 GiB: ~25 s here)")
    ap.add_argument("--rss-bound-pct", type=float, default=10)
    ap.add_argument("--rss-bound-mib", type=float, default=64)
    ap.add_argument("--buffer-bound", type=int, default=8,
                    help="allowed growth of each side's data-plane buffer count after the warm-up")
    ap.add_argument("--idle-timeout", type=float, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the samples and the verdict to this file")
    ap.add_argument("serve_args", nargs="*", help="more flags for moemesh serve (after --)")
    a = ap.parse_args()
    if a.warmup >= a.seconds:
        ap.error("--warmup must be shorter than --seconds")

    port = free_port()
    cmd = [a.binary, "serve", "--port", str(port), "--model", a.model,
           "--expert-workers", str(a.expert_workers), "--kv-cache-gib", str(a.kv_cache_gib),
           *a.serve_args]
    serve = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        return soak(a, port, serve)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)


def soak(a, port, serve):
    deadline = time.time() + 180
    while True:
        if serve.poll() is not None:
            print(f"moemesh serve exited with {serve.returncode}", file=sys.stderr)
            return 1
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            print("moemesh serve did not become healthy in 180 s", file=sys.stderr)
            return 1
        time.sleep(0.2)
    model = get_json(port, "/v1/models")["data"][0]["id"]
    cluster = get_json(port, "/admin/cluster")
    procs = {"serve": serve.pid}
    for m in cluster["members"]:
        procs[m["name"]] = int(m["pid"])
    names = list(procs)

    samples = []

    def ucx_buffers():
        """Data-plane buffer allocations: per expert worker, and all attention workers together."""
        x = get_json(port, "/admin/experts")
        out = {w.get("name", "?"): int(w.get("buffers_total", 0)) for w in x.get("workers", [])}
        out["attention"] = int(x.get("dispatch", {}).get("buffers_total", 0))
        return out

    def sample(phase, t0):
        c = get_json(port, "/admin/cluster")
        s = {"t": round(time.time() - t0, 1), "phase": phase, "buffers": ucx_buffers(),
             "kv": c["engine"].get("kv_cache_usage", 0.0),
             "running": c["engine"].get("running", 0), "waiting": c["engine"].get("waiting", 0),
             "procs": {n: proc_figures(procs[n]) for n in names}}
        samples.append(s)
        return s

    clients = Clients(port, model, a.clients, a.max_tokens, a.seed)
    t0 = time.time()
    clients.start()
    header = f"{'t s':>6} {'phase':>6} {'kv %':>6} {'run':>4} {'wait':>4} {'req':>6} " + " ".join(
        f"{n[:14] + ' MiB/fd':>22}" for n in names) + "  ucx buffers (experts..., attention)"
    print(f"soak: {a.clients} streaming clients for {a.seconds:.0f} s (warm-up {a.warmup:.0f} s) "
          f"against {len(names)} processes; serve pid {serve.pid}")
    print(header)

    def show(s):
        cols = []
        for n in names:
            f = s["procs"][n]
            cols.append(f"{'gone':>22}" if f is None else f"{f[0] / 2**20:>15.1f}/{f[1]:<6}")
        bufs = " ".join(f"{v}" for v in s["buffers"].values())
        print(f"{s['t']:>6} {s['phase']:>6} {100 * s['kv']:>6.1f} {s['running']:>4} "
              f"{s['waiting']:>4} {clients.requests:>6} " + " ".join(cols) + f"  ucx {bufs}",
              flush=True)

    baseline = None
    next_t = t0 + a.interval
    while time.time() - t0 < a.seconds:
        time.sleep(max(0.0, next_t - time.time()))
        next_t += a.interval
        phase = "warmup" if time.time() - t0 < a.warmup else "load"
        s = sample(phase, t0)
        show(s)
        if phase == "load" and baseline is None:
            baseline = s
        if serve.poll() is not None:
            break
    load_last = samples[-1]
    clients.join()
    # Idle: the KV cache must empty.
    idle = None
    idle_deadline = time.time() + a.idle_timeout
    while time.time() < idle_deadline:
        s = sample("idle", t0)
        if s["kv"] == 0 and s["running"] == 0 and s["waiting"] == 0:
            idle = s
            break
        time.sleep(1)
    if idle is None:
        idle = samples[-1]
    time.sleep(2)  # let connections close on the server side
    idle = sample("idle", t0)
    show(idle)

    failures = []
    if baseline is None:
        failures.append("no sample after the warm-up: make --seconds longer than --warmup")
    else:
        for n in names:
            base = baseline["procs"][n]
            for s in (load_last, idle):
                now = s["procs"][n]
                if base is None or now is None:
                    failures.append(f"{n}: process gone")
                    break
                bound = max(base[0] * a.rss_bound_pct / 100, a.rss_bound_mib * 2**20)
                if now[0] - base[0] > bound:
                    failures.append(f"{n}: RSS grew {(now[0] - base[0]) / 2**20:.1f} MiB "
                                    f"({s['phase']}), bound {bound / 2**20:.1f} MiB")
            if base and idle["procs"][n] and idle["procs"][n][1] > base[1]:
                failures.append(f"{n}: open fds grew from {base[1]} to {idle['procs'][n][1]}")
        for side, base in baseline["buffers"].items():
            now = idle["buffers"].get(side, base)
            if now - base > a.buffer_bound:
                failures.append(f"{side}: data-plane buffers grew from {base} to {now} after the "
                                f"warm-up (bound {a.buffer_bound})")
    if idle["kv"] != 0:
        failures.append(f"KV cache usage did not return to 0 when idle: {100 * idle['kv']:.2f}%")
    if clients.errors:
        failures.append(f"{len(clients.errors)} requests failed, first: {clients.errors[0]}")

    print()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.platform()}")
    elapsed = load_last["t"]
    print(f"requests: {clients.requests} finished, {len(clients.errors)} failed, "
          f"{clients.tokens} tokens streamed ({clients.tokens / max(elapsed, 1e-9):.1f} tokens/s)")
    if baseline:
        print(f"{'process':<16} {'RSS warm-up MiB':>16} {'RSS end MiB':>12} {'RSS idle MiB':>13} "
              f"{'fds warm-up':>12} {'fds idle':>9}")
        for n in names:
            b, e, i = baseline["procs"][n], load_last["procs"][n], idle["procs"][n]
            if b and e and i:
                print(f"{n:<16} {b[0] / 2**20:>16.1f} {e[0] / 2**20:>12.1f} {i[0] / 2**20:>13.1f} "
                      f"{b[1]:>12} {i[1]:>9}")
        print(f"{'data-plane side':<16} {'buffers warm-up':>16} {'buffers end':>12} "
              f"{'buffers idle':>13}")
        for side, n in baseline["buffers"].items():
            print(f"{side:<16} {n:>16} {load_last['buffers'].get(side, n):>12} "
                  f"{idle['buffers'].get(side, n):>13}")
    verdict = "PASS" if not failures else "FAIL"
    print(f"soak: {verdict}")
    for f in failures:
        print(f"  {f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"samples": samples, "failures": failures, "requests": clients.requests,
                       "errors": clients.errors[:20], "tokens": clients.tokens}, f, indent=1)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
