"""The engine under load, end to end: 64 concurrent streaming requests of mixed lengths through
`moemesh serve --single-process` finish with the same greedy tokens as when run one at a time,
also when the KV cache is too small for all of them (preemption), and with chunked prefill."""
import json
import threading

import pytest

from conftest import ROOT
from clients import completion_ids, stream
from server import Server

DEMO = ROOT / "models" / "demo"


def start(binary, *args):
    s = Server(binary, "--model", DEMO, "--single-process", "--max-num-seqs", "64", *args)
    s.model_id = json.loads(s.request("GET", "/v1/models")[2])["data"][0]["id"]
    return s


def workload():
    """64 requests: prompts of 3 to 190 token ids, completions of 4 to 40 tokens."""
    reqs = []
    for i in range(64):
        n = 3 + (i * 37) % 188
        prompt = [(i * 131 + t * 17) % 6000 + 3 for t in range(n)]
        reqs.append((prompt, 4 + (i * 11) % 37))
    return reqs


@pytest.mark.parametrize("args", [
    [],                                                    # room for everything
    ["--kv-cache-gib", "0.004"],                           # ~2,000 tokens: preemption
    ["--max-num-batched-tokens", "64", "--no-enable-prefix-caching"],  # prompts in chunks
], ids=["roomy", "tight-cache", "chunked"])
def test_64_concurrent_streams_equal_one_at_a_time(binary, args):
    s = start(binary, *args)
    try:
        reqs = workload()
        results = {}
        threads = [threading.Thread(target=stream, args=(s, p, n, results, i))
                   for i, (p, n) in enumerate(reqs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        expected = [completion_ids(s, p, n) for p, n in reqs]  # one at a time, afterwards
        for i, (p, n) in enumerate(reqs):
            r = results[i]
            assert r["error"] is None and r["finish"] == "length", (i, r)
            assert r["tokens"] == expected[i], i
        if "--kv-cache-gib" in args:
            assert s.metric("vllm:num_preemptions_total") > 0
        assert s.metric("moemesh_engine_requests_failed_total") == 0
    finally:
        s.stop()
