"""Fault injection through a real cluster: the data plane drops, delays and corrupts chosen
messages and an expert worker stalls (MOEMESH_FAULTS, transport/detail/faults.h).

Every request must either complete with the tokens it gets without faults, or fail with a clear
error soon after the fault; nothing hangs; the cluster serves again afterwards; and every
injected fault shows in /metrics, next to the events it caused (timeouts, checksum failures,
rerouted slots, failed steps, retries).

Needs a test build configured with -DMOEMESH_FAULT_INJECTION=ON (the ASan build of
scripts/sanitize); skipped with a message in other builds.
"""
import json
import re
import subprocess
import time

import pytest

from conftest import ROOT
from server import Server
from clients import stream

DEMO = ROOT / "models" / "demo"
TOKEN = "e2e-faults-token"
TIMEOUT_MS = 500
PROMPTS = [[3 + i, 17, 42, 99 + i] for i in range(6)]
MAX_TOKENS = 24


@pytest.fixture(scope="module", autouse=True)
def needs_fault_injection(binary):
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout
    if "fault injection: on" not in out:
        pytest.skip("this moemesh build has no fault injection (configure with "
                    "-DMOEMESH_FAULT_INJECTION=ON; scripts/sanitize --asan runs these tests)")


@pytest.fixture(scope="module")
def expected(binary):
    """The greedy outputs of PROMPTS from a single process, without faults."""
    s = Server(binary, "--model", DEMO, "--single-process")
    try:
        s.model_id = json.loads(s.request("GET", "/v1/models")[2])["data"][0]["id"]
        return [run_one(s, p)["tokens"] for p in PROMPTS]
    finally:
        s.stop()


def start(binary, faults, *args):
    s = Server(binary, "--model", DEMO, "--cluster-token", TOKEN, "--expert-workers", 2,
               "--dispatch-timeout-ms", TIMEOUT_MS, *args, env={"MOEMESH_FAULTS": faults})
    s.model_id = json.loads(s.request("GET", "/v1/models")[2])["data"][0]["id"]
    return s


def run_one(server, prompt):
    results = {}
    t0 = time.time()
    stream(server, prompt, MAX_TOKENS, results, 0)
    r = results[0]
    r["seconds"] = r["end"] - t0
    return r


def metrics(server):
    """{(name, frozenset(labels without model_name)): value} of /metrics."""
    out = {}
    text = server.request("GET", "/metrics")[2].decode()
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)\{([^}]*)\} (\S+)$", line)
        if not m:
            continue
        labels = frozenset(kv for kv in m.group(2).split(",") if not kv.startswith("model_name="))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(m, name, **labels):
    want = frozenset(f'{k}="{v}"' for k, v in labels.items())
    return sum(v for (n, l), v in m.items() if n == name and want <= l)


def settled_metrics(server):
    """/metrics once two polls of the router agree (the gateway's figures lag by one poll)."""
    last = None
    for _ in range(50):
        m = metrics(server)
        keys = [k for k in m if k[0].startswith("moemesh_dataplane_")]
        snapshot = {k: m[k] for k in keys}
        if snapshot == last:
            return m
        last = snapshot
        time.sleep(0.6)
    return m


def check_outcomes(results, expected, allow_errors):
    """Every request completed with its fault-free tokens or failed with a clear error quickly."""
    failed = 0
    for i, r in enumerate(results):
        assert r["seconds"] < 20, f"request {i} took {r['seconds']:.1f} s"
        if r["error"] is None:
            assert r["tokens"] == expected[i % len(expected)], f"request {i} completed wrongly"
            assert r["finish"] == "length"
        else:
            failed += 1
            assert allow_errors, f"request {i} failed: {r['error']}"
            text = json.dumps(r["error"])
            assert ("did not answer within" in text or "checksum" in text
                    or "no live copy" in text), text
    return failed


def test_without_replicas_a_lost_reply_fails_its_request_clearly_and_the_cluster_recovers(
        binary, expected):
    # Each expert worker drops its 60th reply and corrupts its 150th; the attention worker
    # corrupts its 250th dispatch.
    s = start(binary, "reply.drop@60;reply.corrupt@150;dispatch.corrupt@250")
    try:
        results = [run_one(s, p) for p in PROMPTS * 2]
        failed = check_outcomes(results, expected, allow_errors=True)
        assert failed >= 1, "a dropped reply without a replica must fail its request"
        # A failed request ends within about a dispatch timeout of its fault, not after a hang.
        for r in results:
            if r["error"] is not None:
                assert r["seconds"] < 5 + TIMEOUT_MS / 1000
        # The workers that timed out are still used (the last resort for their experts): the
        # cluster serves without a restart, and only the requests in a faulty step failed.
        assert failed <= 6, [r["error"] for r in results]
        again = [run_one(s, p) for p in PROMPTS]
        assert [r["error"] for r in again] == [None] * len(again)
        assert [r["tokens"] for r in again] == expected

        m = settled_metrics(s)
        drops = value(m, "moemesh_dataplane_faults_injected_total", kind="drop")
        corrupt = value(m, "moemesh_dataplane_faults_injected_total", kind="corrupt")
        assert drops == 2 and corrupt == 3, (drops, corrupt)
        assert value(m, "moemesh_dataplane_timeouts_total") >= drops
        assert value(m, "moemesh_dataplane_checksum_failures_total", side="attention") + \
            value(m, "moemesh_dataplane_late_replies_total") >= corrupt
        assert value(m, "moemesh_dataplane_failed_steps_total") >= failed
        assert value(m, "vllm:request_success_total", finished_reason="error") >= failed
    finally:
        s.stop()


def test_with_replicas_drops_corruption_delays_and_a_stall_cost_no_request(binary, expected):
    # Faults on one copy only (both copies failing in one step fails it, as it should): expert-0
    # drops its 100th reply, corrupts its 200th and stalls 1.2 s at its 300th batch, and delays
    # every 90th reply; the attention worker delays every 70th dispatch. Corrupted dispatches are
    # in the test without replicas: they can reach either copy.
    faults = ("expert-0/reply.drop@100;expert-0/reply.corrupt@200;"
              "expert-0/expert.stall=1200ms@300;expert-0/reply.delay=100ms@every:90;"
              "dispatch.delay=50ms@every:70")
    s = start(binary, faults, "--expert-replicas", 2)
    try:
        results = [run_one(s, p) for p in PROMPTS * 3]
        check_outcomes(results, expected, allow_errors=False)
        m = settled_metrics(s)
        injected = {k: value(m, "moemesh_dataplane_faults_injected_total", kind=k)
                    for k in ("drop", "delay", "corrupt", "stall")}
        assert injected["drop"] == 1 and injected["stall"] == 1, injected
        assert injected["corrupt"] == 1 and injected["delay"] >= 3, injected
        assert value(m, "moemesh_dataplane_timeouts_total") >= injected["drop"] + injected["stall"]
        assert value(m, "moemesh_dataplane_checksum_failures_total") + \
            value(m, "moemesh_dataplane_late_replies_total") >= injected["corrupt"]
        assert value(m, "moemesh_dataplane_rerouted_slots_total") > 0
        assert value(m, "moemesh_dataplane_worker_retries_total") >= 1  # expert-0 after a back-off
        assert value(m, "moemesh_dataplane_failed_steps_total") == 0
        assert value(m, "vllm:request_success_total", finished_reason="error") == 0
    finally:
        s.stop()


def test_a_bad_fault_spec_stops_the_worker_with_its_reason(binary):
    with pytest.raises(RuntimeError, match="exited"):
        start(binary, "reply.explode@1")
