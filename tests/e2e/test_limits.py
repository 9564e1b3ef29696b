"""The gateway's limits, from outside the process: each refusal is an OpenAI error that names the
limit and its flag (400 for what a request asks, 429 with Retry-After for what the server holds),
and each is counted in moemesh_requests_rejected_total{reason}."""
import http.client
import json
import time

import pytest

from conftest import ROOT
from server import Server

DEMO = ROOT / "models" / "demo"
NAME = "demo"


def rejected(server, reason):
    _, _, body = server.request("GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith("moemesh_requests_rejected_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no moemesh_requests_rejected_total series for reason {reason}")


def error_of(resp):
    st, headers, body = resp
    js = json.loads(body)
    assert set(js["error"]) >= {"message", "type", "param", "code"} and js["error"]["code"] == st
    return st, js["error"], headers


# One engine slot, so that a second request waits for the first: the queue and the open requests
# of a client are then under the test's control.
@pytest.fixture(scope="module")
def server(binary):
    s = Server(binary, "--model", DEMO, "--single-process", "--max-num-seqs", "1",
               "--max-n", "4", "--max-tokens-limit", "600", "--max-body-bytes", "4096",
               "--max-streams-per-client", "2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def queue_server(binary):
    s = Server(binary, "--model", DEMO, "--single-process", "--max-num-seqs", "1",
               "--max-queued-requests", "1")
    yield s
    s.stop()


def completion(server, **fields):
    return server.request("POST", "/v1/completions", {"model": NAME, **fields})


def test_body_over_max_body_bytes_is_413(server):
    before = rejected(server, "body_size")
    st, err, _ = error_of(completion(server, prompt="x" * 5000))
    assert st == 413 and "4096 bytes" in err["message"] and "--max-body-bytes" in err["message"]
    assert rejected(server, "body_size") == before + 1


def test_prompt_that_fills_the_context_is_400_with_the_numbers(server):
    max_len = json.loads(server.request("GET", "/v1/models")[2])["data"][0]["max_model_len"]
    before = rejected(server, "prompt_length")
    st, err, _ = error_of(completion(server, prompt=[5] * max_len, max_tokens=1))
    assert st == 400 and err["param"] == "prompt"
    assert f"maximum context length is {max_len} tokens" in err["message"]
    assert f"has {max_len} tokens" in err["message"]
    assert rejected(server, "prompt_length") == before + 1


def test_max_tokens_over_the_context_is_400_naming_max_tokens(server):
    max_len = json.loads(server.request("GET", "/v1/models")[2])["data"][0]["max_model_len"]
    prompt = [5] * (max_len - 100)
    before = rejected(server, "max_tokens")
    st, err, _ = error_of(completion(server, prompt=prompt, max_tokens=200))
    assert st == 400 and err["param"] == "max_tokens"
    assert f"maximum context length is {max_len} tokens" in err["message"]
    assert f"requested {max_len + 100} tokens" in err["message"] and "at most 100" in err["message"]
    # Chat names its own field.
    st, err, _ = error_of(server.request("POST", "/v1/chat/completions", {
        "model": NAME, "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 10 ** 6}))
    assert st == 400 and err["param"] == "max_completion_tokens"
    assert rejected(server, "max_tokens") == before + 2


def test_max_tokens_over_max_tokens_limit_is_400(server):
    st, err, _ = error_of(completion(server, prompt="hi", max_tokens=601))
    assert st == 400 and err["param"] == "max_tokens"
    assert "601" in err["message"] and "600" in err["message"]
    assert "--max-tokens-limit" in err["message"]
    st, _, body = completion(server, prompt="hi", max_tokens=2, temperature=0)
    assert st == 200, body
    # Chat without max_tokens fills the rest of the context, capped by the limit: accepted.
    st, _, body = server.request("POST", "/v1/chat/completions", {
        "model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
        "ignore_eos": True}, timeout=120)
    assert st == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] == 600


def test_n_over_max_n_is_400(server):
    before = rejected(server, "n")
    st, err, _ = error_of(completion(server, prompt="hi", n=5, max_tokens=1))
    assert st == 400 and err["param"] == "n"
    assert "between 1 and 4" in err["message"] and "--max-n" in err["message"]
    assert rejected(server, "n") == before + 1
    st, _, body = completion(server, prompt="hi", n=4, max_tokens=1)
    assert st == 200 and len(json.loads(body)["choices"]) == 4


class Stream:
    """A streaming completion held open: the response headers have arrived. `long` asks for 32
    prompts of 590 tokens each (tens of seconds on one engine slot, until the test closes it),
    so that the request outlasts the test's checks on any machine."""

    def __init__(self, server, long=False):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        prompt = [[5 + i, 17, 23] for i in range(32)] if long else "Once upon a time"
        self.conn.request("POST", "/v1/completions", json.dumps({
            "model": NAME, "prompt": prompt, "max_tokens": 590 if long else 16,
            "ignore_eos": True, "temperature": 0, "stream": True}),
            {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        assert self.status == 200, self.resp.read()

    def first_token(self):
        while True:
            line = self.resp.readline()
            assert line, "the stream ended before its first token"
            if line.startswith(b"data: {"):
                return

    def close(self):
        self.conn.close()


def wait_for(predicate, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_requests_beyond_the_queue_limit_get_429_with_retry_after(queue_server):
    server = queue_server
    before = rejected(server, "queue_full")
    running = Stream(server, long=True)
    assert running.status == 200
    running.first_token()  # it runs: no longer queued
    waiting = Stream(server)  # the engine's one slot is taken: this one waits
    assert waiting.status == 200
    try:
        st, err, headers = error_of(completion(server, prompt="hi", max_tokens=1))
        assert st == 429 and err["type"] == "RateLimitError"
        assert "--max-queued-requests" in err["message"] and "1 requests are queued" in err["message"]
        assert int(headers["Retry-After"]) >= 1
        assert rejected(server, "queue_full") == before + 1
    finally:
        running.close()
        waiting.close()
    # The client left: its requests are cancelled and the queue empties.
    assert wait_for(lambda: completion(server, prompt="hi", max_tokens=1)[0] == 200)


def test_streams_beyond_the_per_client_limit_get_429_with_retry_after(server):
    assert wait_for(lambda: server.metric("moemesh_open_streams") == 0)
    before = rejected(server, "streams_per_client")
    first = Stream(server, long=True)
    first.first_token()
    second = Stream(server)
    try:
        assert first.status == 200 and second.status == 200
        st, err, headers = error_of(completion(server, prompt="hi", max_tokens=1, stream=True))
        assert st == 429 and err["type"] == "RateLimitError"
        assert "--max-streams-per-client" in err["message"] and "2 are open" in err["message"]
        assert int(headers["Retry-After"]) >= 1
        assert rejected(server, "streams_per_client") == before + 1
    finally:
        first.close()
        second.close()
    assert wait_for(lambda: completion(server, prompt="hi", max_tokens=1)[0] == 200)
