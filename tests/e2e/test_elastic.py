"""The elastic expert pool under continuous load: expert workers join and leave while concurrent
greedy streams run, and not one request fails or changes its tokens; a scheduled rebalance runs
by itself; the pool's autoscaling signal is exported.
"""
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import ROOT
from server import Server
from clients import completion_ids, stream

TOKEN = "e2e-elastic-token"
DEMO = ROOT / "models" / "demo"
PROMPTS = [[3 + i, 11, 42, 97 + i] for i in range(6)]
TOKENS = 24


def get(server, path):
    status, _, raw = server.request("GET", path)
    assert status == 200, (path, raw)
    return json.loads(raw)


def experts(server):
    return {m["name"]: m for m in get(server, "/admin/cluster")["members"] if m["role"] == "expert"}


def wait_until(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


class Load:
    """Concurrent clients streaming greedy completions of PROMPTS until stopped."""

    def __init__(self, server, clients=3):
        self.server = server
        self.results = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(c,)) for c in range(clients)]
        for t in self.threads:
            t.start()

    def run(self, client):
        i = client
        while not self.stop.is_set():
            out = {}
            start = time.time()
            stream(self.server, PROMPTS[i % len(PROMPTS)], TOKENS, out, 0)
            out[0]["prompt"] = i % len(PROMPTS)
            out[0]["seconds"] = time.time() - start
            self.results.append(out[0])
            i += 1

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(120)
        return self.results


def start_expert(binary, join, name):
    return subprocess.Popen([str(binary), "expert", "--join", join, "--model", str(DEMO),
                             "--threads", "1", "--name", name, "--net-devices", "lo"],
                            env={**os.environ, "MOEMESH_CLUSTER_TOKEN": TOKEN},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def test_two_to_three_to_one_expert_workers_under_load_fails_nothing(binary):
    s = Server(binary, "--model", DEMO, "--cluster-token", TOKEN, "--expert-workers", 2,
               "--admin-token", "adm")
    s.model_id = get(s, "/v1/models")["data"][0]["id"]
    extra = None
    try:
        expected = [completion_ids(s, p, TOKENS) for p in PROMPTS]
        load = Load(s)
        wait_until(lambda: len(load.results) >= 3, 60, "the load to run")

        # 2 -> 3: the new worker takes its share of every layer while the streams run.
        join = get(s, "/admin/cluster")["join"]
        extra = start_expert(binary, join, "expert-new")
        wait_until(lambda: experts(s).get("expert-new", {}).get("experts_held", 0) >= 8, 30,
                   "the new worker to take its share")
        held = {n: m["experts_held"] for n, m in experts(s).items()}
        assert sum(held.values()) == 4 * 8 and min(held.values()) >= 8, held
        wait_until(lambda: len(load.results) >= 12, 60, "more requests on three workers")

        # 3 -> 1: SIGTERM to two workers (one started by serve, one by us): each drains first.
        first = experts(s)["expert-1"]
        os.kill(int(first["pid"]), signal.SIGTERM)
        extra.send_signal(signal.SIGTERM)
        assert extra.wait(60) == 0, "the drained worker exits cleanly"
        wait_until(lambda: list(experts(s)) == ["expert-0"], 60, "two workers to leave")
        assert experts(s)["expert-0"]["experts_held"] == 4 * 8
        done = len(load.results)
        wait_until(lambda: len(load.results) >= done + 6, 60, "more requests on one worker")
        results = load.finish()

        assert len(results) >= 18, len(results)
        for r in results:
            assert r["error"] is None and r["finish"] == "length", r
            assert r["tokens"] == expected[r["prompt"]], r
            assert r["seconds"] < 20, f"a stream took {r['seconds']:.1f} s"
        snap = get(s, "/admin/cluster")
        assert snap["engine"]["requests_failed_total"] == "0", snap["engine"]
        assert snap["ready"]
        # No step waited for a deadline or failed: every dispatch was answered, and no slot had
        # to be rerouted or dropped while the pool changed (stalls would show as timeouts).
        dispatch = next(a for a in snap["actors"] if a["role"] == "attention")["attention"]
        for counter in ("timeouts_total", "failed_steps_total", "dropped_slots_total",
                        "rerouted_slots_total"):
            assert dispatch["dispatch"][counter] == "0", dispatch["dispatch"]
    finally:
        if extra and extra.poll() is None:
            extra.kill()
        s.stop()


def test_a_scheduled_rebalance_runs_and_the_pool_signal_is_exported(binary):
    s = Server(binary, "--model", DEMO, "--cluster-token", TOKEN, "--expert-workers", 2,
               "--rebalance-interval", 1, "--rebalance-threshold", 1.0, "--redundant-experts", 1)
    s.model_id = get(s, "/v1/models")["data"][0]["id"]
    try:
        # One redundant copy per layer: 4 layers x (8 + 1) copies.
        wait_until(lambda: sum(m["experts_held"] for m in experts(s).values()) == 4 * 9, 10,
                   "the redundant copies")
        expected = completion_ids(s, PROMPTS[0], TOKENS)
        for p in PROMPTS:
            completion_ids(s, p, TOKENS)
        wait_until(lambda: s.metric("moemesh_rebalances_total") >= 1, 15,
                   "a scheduled rebalance by load")
        assert completion_ids(s, PROMPTS[0], TOKENS) == expected
        _, _, body = s.request("GET", "/metrics")
        text = body.decode()
        assert "moemesh_expert_pool_utilisation{" in text
        assert s.metric("moemesh_expert_workers") == 2
    finally:
        s.stop()
