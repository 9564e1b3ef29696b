"""`moemesh serve` through the official openai client and raw HTTP: streaming and not, chat and
completions, usage, n, stop, logprobs, seeds, every error case, disconnects, and survival."""
import json
import re
import socket
import subprocess
import time

import openai
import pytest
import yaml

from conftest import ROOT
from server import Server

import os
import signal
import pathlib

# The served model: the built-in demo model unless MOEMESH_SERVE_MODEL names another checkpoint.
DEMO = pathlib.Path(os.environ.get("MOEMESH_SERVE_MODEL", ROOT / "models" / "demo"))
NAME = DEMO.name


@pytest.fixture(scope="module")
def server(binary):
    assert (DEMO / "config.json").exists(), f"{DEMO} is missing"
    s = Server(binary, "--model", DEMO, "--max-num-seqs", 8)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_models_list(server):
    st, _, body = server.request("GET", "/v1/models")
    assert st == 200
    js = json.loads(body)
    m = js["data"][0]
    assert js["object"] == "list" and m["object"] == "model" and m["id"] == NAME
    assert m["root"] == str(DEMO.resolve()) and m["max_model_len"] > 0


def test_completion_greedy_stream_equals_non_stream(client, model):
    args = dict(model=model, prompt="Once upon a time", max_tokens=24, temperature=0)
    full = client.completions.create(**args)
    assert full.object == "text_completion" and full.choices[0].text
    assert full.usage.completion_tokens == 24 and full.choices[0].finish_reason == "length"
    assert full.usage.total_tokens == full.usage.prompt_tokens + 24
    pieces = [c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices]
    assert "".join(pieces) == full.choices[0].text


def test_chat_stream_with_usage(client, model):
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me about the sea."}],
        max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = [c for c in chunks if c.usage]
    assert len(usage) == 1 and chunks[-1].usage and chunks[-1].choices == []
    assert all(c.usage is None for c in chunks[:-1])
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert usage[0].usage.completion_tokens >= 1 and isinstance(text, str)


def test_chat_non_stream(client, model):
    r = client.chat.completions.create(model=model, messages=[
        {"role": "system", "content": "You are a storyteller."},
        {"role": "user", "content": "Begin a story."}], max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert 1 <= r.usage.completion_tokens <= 12 and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10  # the system prompt and the template's markers


def test_n_and_seed(client, model):
    args = dict(model=model, prompt="The king said", max_tokens=12, temperature=1.0, seed=7, n=3)
    a = client.completions.create(**args)
    b = client.completions.create(**args)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # different seeds per choice
    assert a.usage.completion_tokens <= 36
    assert a.usage.prompt_tokens == client.completions.create(model=model, prompt="The king said",
                                                              max_tokens=1).usage.prompt_tokens


def test_stop_string_is_never_emitted(client, model):
    base = client.completions.create(model=model, prompt="It was a dark and stormy night",
                                     max_tokens=32, temperature=0).choices[0].text
    stop = base[len(base) // 2: len(base) // 2 + 3]
    assert len(stop) == 3
    for stream in (False, True):
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(
                model=model, prompt="It was a dark and stormy night", max_tokens=32, temperature=0,
                stop=[stop], stream=True) if c.choices)
        else:
            r = client.completions.create(model=model, prompt="It was a dark and stormy night",
                                          max_tokens=32, temperature=0, stop=[stop])
            text = r.choices[0].text
            assert r.choices[0].finish_reason == "stop"
        assert stop not in text
        assert text == base[: base.index(stop)]


def test_completion_logprobs(client, model):
    r = client.completions.create(model=model, prompt="The old man", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 and len(lp.token_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    # Greedy: the sampled token is the most likely one.
    for tok, lpv, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert abs(max(top.values()) - lpv) < 1e-4


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(c.top_logprobs) == 2 for c in content)


def test_echo(client, model):
    r = client.completions.create(model=model, prompt="In the beginning", max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text.startswith("In the beginning")


def test_tokenize_detokenize(server, model):
    st, _, body = server.request("POST", "/tokenize", {"model": model, "prompt": "Hello world"})
    assert st == 200
    js = json.loads(body)
    assert js["count"] == len(js["tokens"]) > 0 and js["max_model_len"] > 0
    st, _, body = server.request("POST", "/detokenize", {"model": model, "tokens": js["tokens"]})
    assert st == 200 and json.loads(body)["prompt"] == "Hello world"


def test_request_id_is_echoed(server, model):
    st, headers, _ = server.request("POST", "/v1/completions", {"model": model, "prompt": "a", "max_tokens": 1},
                                    headers={"x-request-id": "abc-123"})
    assert st == 200 and headers.get("x-request-id") == "abc-123"


def test_metrics_names(server):
    text = server.request("GET", "/metrics")[2].decode()
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count"]:
        assert name in text, name
    assert f'model_name="{NAME}"' in text


def test_prefix_cache_counters_count_a_repeated_prompt(server, model):
    """A prompt sent twice is found in the prefix cache the second time (whole blocks of 16)."""
    def counters():
        text = server.request("GET", "/metrics")[2].decode()
        value = lambda n: float(re.search(rf"^{n}{{[^}}]*}} (\S+)$", text, re.M).group(1))
        return value("vllm:prefix_cache_queries_total"), value("vllm:prefix_cache_hits_total")
    prompt = "The old house stood at the end of the lane, and every evening the wind " * 3
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    q0, h0 = counters()
    assert server.request("POST", "/v1/completions", body)[0] == 200
    assert server.request("POST", "/v1/completions", body)[0] == 200
    deadline = time.time() + 10
    while time.time() < deadline:  # the gateway polls the engine's counters
        q, h = counters()
        if h - h0 >= 16:
            break
        time.sleep(0.2)
    assert h - h0 >= 16 and q - q0 > h - h0, (q0, h0, q, h)


def test_alert_rules_use_served_series(server):
    """deploy/prometheus's alert rules: the guide's three thresholds, on series /metrics serves."""
    rules = yaml.safe_load((ROOT / "deploy/prometheus/moemesh-alerts.yaml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {a["labels"]["severity"] for a in alerts.values()} == {"warning", "critical"}
    text = server.request("GET", "/metrics")[2].decode()
    wanted = {"vllm:e2e_request_latency_seconds_bucket": ("> 30", "warning"),
              "vllm:kv_cache_usage_perc": ("> 0.95", "critical"),
              "vllm:num_requests_waiting": ("> 100", "warning")}
    for series, (threshold, severity) in wanted.items():
        rule = next(a for a in alerts.values() if series in a["expr"])
        assert rule["expr"].rstrip().endswith(threshold) and rule["labels"]["severity"] == severity
        assert series in text, series


def error_of(resp):
    st, _, body = resp
    js = json.loads(body)
    assert set(js["error"]) >= {"message", "type", "param", "code"} and js["error"]["code"] == st
    return st, js["error"]["message"]


@pytest.mark.parametrize("body, status, needle", [
    ({"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": NAME, "prompt": "x", "top_p": 5}, 400, "top_p"),
    ({"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "n": 0}, 400, "n must"),
    ({"model": NAME, "prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ({"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": NAME, "prompt": 12}, 400, "prompt"),
    ({"model": NAME}, 400, "prompt"),
    ({"model": NAME, "prompt": [10**9]}, 400, "token ids"),
    ({"model": NAME, "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"model": "nope", "prompt": "x"}, 404, "The model `nope` does not exist."),
    ({"model": NAME, "prompt": "x", "max_tokens": 10**7}, 400, "maximum context length is"),
])
def test_completion_errors(server, body, status, needle):
    st, msg = error_of(server.request("POST", "/v1/completions", body))
    assert st == status and needle in msg


def test_chat_errors(server):
    st, msg = error_of(server.request("POST", "/v1/chat/completions", {"model": NAME, "messages": "hi"}))
    assert st == 400 and "messages" in msg
    st, msg = error_of(server.request("POST", "/v1/chat/completions",
                                      {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}))
    assert st == 400


def test_http_level_errors(server):
    st, msg = error_of(server.request("POST", "/v1/completions", raw=b"{not json"))
    assert st == 400 and "JSON" in msg
    st, msg = error_of(server.request("POST", "/v1/completions", raw=b"x=1",
                                      headers={"Content-Type": "application/x-www-form-urlencoded"}))
    assert st == 415
    st, msg = error_of(server.request("POST", "/v1/completions", raw=b"{" + b" " * (9 << 20) + b"}"))
    assert st == 413
    st, _ = error_of(server.request("GET", "/v1/nothing-here"))
    assert st == 404


def test_survives_many_malformed_requests(server, model):
    sock = socket.create_connection(("127.0.0.1", server.port))
    f = sock.makefile("rb")
    bad = [b'{"prompt": ', b'[]', b'{"model": NAME, "prompt": "x", "n": "two"}', b'\xff\xfe',
           b'{"model": NAME, "messages": [1, 2]}', b'{"model": NAME, "prompt": {"a": 1}}']
    for i in range(1000):
        body = bad[i % len(bad)]
        path = "/v1/chat/completions" if i % 2 else "/v1/completions"
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        status = f.readline()
        assert b" 400 " in status, (i, status)
        length = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        f.read(length)
    sock.close()
    # Garbage that is not HTTP at all.
    for junk in (b"\x00\x01\x02garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(junk)
        s.settimeout(5)
        try:
            s.recv(4096)
        except OSError:
            pass
        s.close()
    st, _, body = server.request("POST", "/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 3})
    assert st == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
    assert server.request("GET", "/health")[0] == 200


def test_disconnect_cancels_the_request(server, model):
    aborted = server.metric("moemesh_engine_requests_aborted_total")
    max_len = json.loads(server.request("GET", "/v1/models")[2])["data"][0]["max_model_len"]
    body = json.dumps({"model": model, "prompt": "A long tale", "max_tokens": max_len - 16,
                       "ignore_eos": True, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    s.settimeout(60)
    got = s.recv(4096)
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    while got.count(b"data: ") < 3:
        got += s.recv(4096)
    s.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        if server.metric("moemesh_engine_requests_aborted_total") > aborted and \
                server.metric("vllm:num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert server.metric("moemesh_engine_requests_aborted_total") > aborted
    assert server.metric("vllm:num_requests_running") == 0


def test_api_key(binary):
    s = Server(binary, "--model", DEMO, "--api-key", "sekrit")
    try:
        body = {"model": NAME, "prompt": "x", "max_tokens": 1}
        assert error_of(s.request("POST", "/v1/completions", body))[0] == 401
        assert error_of(s.request("POST", "/v1/completions", body, headers={"Authorization": "Bearer nope"}))[0] == 401
        assert s.request("POST", "/v1/completions", body, headers={"Authorization": "Bearer sekrit"})[0] == 200
        assert s.request("GET", "/health")[0] == 200  # health needs no key
    finally:
        assert s.stop() == 0


def role_pids(server):
    """The role processes serve started (its children)."""
    out = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_during_request(binary, stop, *args, n=8, max_tokens=200):
    """Starts serve and a long completion, calls stop(server) once that request is running, and
    returns (serve's exit code, the request's result, the role pids). The grace (unless args set
    one) and the stops' timeouts leave room for slow builds (sanitizers)."""
    import threading
    if "--shutdown-grace" not in args:
        args = (*args, "--shutdown-grace", "300")
    s = Server(binary, "--model", DEMO, *args)
    roles = role_pids(s)
    assert len(roles) == 3, roles  # router in serve; 2 expert workers and 1 attention worker
    result = {}

    def long_request():
        try:
            result["r"] = s.request("POST", "/v1/completions", {"model": NAME, "prompt": "Drain", "n": n,
                                                                 "max_tokens": max_tokens, "ignore_eos": True},
                                    timeout=600)
        except OSError as e:  # a cancelled request's connection is closed without a response
            result["r"] = e

    t = threading.Thread(target=long_request)
    running_before = s.metric("vllm:num_requests_running")
    t.start()
    deadline = time.time() + 30
    while s.metric("vllm:num_requests_running") <= running_before and time.time() < deadline:
        time.sleep(0.02)
    code = stop(s)
    t.join()
    return code, result["r"], roles


def completion_tokens(result):
    assert not isinstance(result, OSError), result
    st, _, body = result
    assert st == 200, body[:400]
    return json.loads(body)["usage"]["completion_tokens"]


def test_sigterm_drains_requests_in_flight(binary):
    # SIGTERM to serve alone, as a container runtime stops it: serve drains, then stops its roles.
    code, result, roles = stop_during_request(binary, lambda s: s.stop(group=False, timeout=300))
    assert code == 0
    assert completion_tokens(result) == 8 * 200
    assert not [p for p in roles if alive(p)]  # every role process is gone with serve


def test_a_signal_to_the_process_group_drains_too(binary):
    # Ctrl-C in a terminal signals serve's whole process group; the role processes lead their own
    # groups, so only serve hears it, and it drains before it stops them.
    for sig in (signal.SIGINT, signal.SIGTERM):
        code, result, roles = stop_during_request(
            binary, lambda s: s.stop(sig=sig, group=True, timeout=300))
        assert code == 0, sig
        assert completion_tokens(result) == 8 * 200, sig
        assert not [p for p in roles if alive(p)], sig


def test_a_second_signal_cancels_the_requests_in_flight(binary):
    # 16 x 1000 tokens take seconds (12 s on 2 vCPUs); the second SIGINT, 1 s into the drain,
    # cancels them: serve exits 0 long before its grace runs out and the request comes back short.
    def twice(s):
        os.kill(s.proc.pid, signal.SIGINT)
        time.sleep(1)
        assert s.proc.poll() is None  # still draining
        return s.stop(sig=signal.SIGINT, timeout=120, group=False)

    code, result, roles = stop_during_request(binary, twice, "--shutdown-grace", "3000", n=16,
                                              max_tokens=1000)
    assert code == 0
    if not isinstance(result, OSError):  # else: closed without a response, as cancelled requests are
        st, _, body = result
        assert st != 200 or json.loads(body)["usage"]["completion_tokens"] < 16000, body[:400]
    assert not [p for p in roles if alive(p)]


def test_many_concurrent_streams(server, model):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        c = openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0, timeout=300)
        chunks = list(c.completions.create(model=model, prompt=f"Story number {i}:", max_tokens=20,
                                           temperature=0.8, seed=i, stream=True,
                                           extra_body={"ignore_eos": True},
                                           stream_options={"include_usage": True}))
        return chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(32) as pool:
        assert list(pool.map(one, range(32))) == [20] * 32


def test_reused_request_id_cancels_only_its_own_request(server, model):
    # Two requests with the same x-request-id: disconnecting one must not stop the other.
    import threading
    result = {}

    def survivor():
        result["r"] = server.request("POST", "/v1/completions",
                                     {"model": model, "prompt": "Both", "max_tokens": 60, "ignore_eos": True},
                                     headers={"x-request-id": "same-id"})

    body = json.dumps({"model": model, "prompt": "Both", "max_tokens": 400, "ignore_eos": True,
                       "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"x-request-id: same-id\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    s.settimeout(60)
    got = s.recv(4096)
    while got.count(b"data: ") < 2:
        got += s.recv(4096)
    t = threading.Thread(target=survivor)
    t.start()
    time.sleep(0.05)
    s.close()
    t.join()
    st, headers, out = result["r"]
    assert st == 200 and json.loads(out)["usage"]["completion_tokens"] == 60
    assert headers.get("x-request-id") == "same-id"
