"""The disaggregated cluster of `moemesh serve`: real role processes joined over loopback.

Greedy outputs through the cluster must equal the reference tokens of the parity fixtures (which
the single process already matches), over shared memory and over TCP; losing workers must fail
only what it has to, cleanly and quickly; capacity factors must count and drop what they say.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time

import pytest

from conftest import FIXTURES, ROOT, fixture_with_tokenizer
from server import Server
from clients import completion_ids, stream

TOKEN = "e2e-cluster-token"
DEMO = ROOT / "models" / "demo"


def start(binary, model, *args):
    s = Server(binary, "--model", model, "--cluster-token", TOKEN, *args)
    status, _, raw = s.request("GET", "/v1/models")
    s.model_id = json.loads(raw)["data"][0]["id"]
    return s


def cluster(server):
    status, _, raw = server.request("GET", "/admin/cluster")
    assert status == 200, raw
    return json.loads(raw)


def members(server, role):
    return [m for m in cluster(server)["members"] if m["role"] == role]


def wait_until(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def assert_still_running(results):
    ended = {i: (r["finish"], r["error"], len(r["tokens"])) for i, r in results.items()
             if r["finish"] is not None or r["error"] is not None}
    assert not ended, f"streams ended before the kill: {ended}"


def start_streams(server, prompts, max_tokens, started=4, n=4, attempts=3):
    """Starts one streaming request per prompt (n choices each, so that they run long enough for
    the tests to act while they run); returns once each has `started` tokens and none has ended.
    On a loaded 2-core machine the test process itself can stall for a second or more while the
    first streams run to their end: then it waits for them all and starts again."""
    for attempt in range(attempts):
        results = {}
        threads = [threading.Thread(target=stream, args=(server, p, max_tokens, results, i, n))
                   for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        wait_until(lambda results=results: len(results) == len(prompts) and all(
            len(r["tokens"]) >= started or r["end"] is not None for r in results.values()), 60,
            "every stream to start")
        if all(r["end"] is None for r in results.values()):
            return results, threads
        for t in threads:
            t.join(60)
    pytest.fail(f"in {attempts} attempts, some streams ended before the last one started")


PARITY = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.json").exists())


@pytest.mark.parametrize("transports", ["sm", "tcp"])
@pytest.mark.parametrize("name", PARITY)
def test_cluster_greedy_output_equals_the_reference(binary, tmp_path, name, transports):
    ref = json.loads((FIXTURES / name / "reference.json").read_text())
    model = fixture_with_tokenizer(tmp_path, name)
    s = start(binary, model, "--transports", transports, "--expert-workers", 2)
    try:
        got = completion_ids(s, ref["prompt_ids"], len(ref["output_ids"]))
        assert got == ref["output_ids"]
        experts = json.loads(s.request("GET", "/admin/experts")[2])
        held = {w for l in experts["layers"] for e in l["experts"] for w in e["workers"]}
        assert len(held) == 2, "both expert workers hold experts"
        # Counted by the attention worker, summed by the router, served by the gateway (its poll
        # lags): dispatches, none of them from GPU memory on a CPU cluster.
        deadline = time.time() + 5
        while s.metric("moemesh_dataplane_dispatches_total") == 0 and time.time() < deadline:
            time.sleep(0.2)
        assert s.metric("moemesh_dataplane_dispatches_total") > 0
        assert "moemesh_dataplane_device_dispatches_total{" in s.request("GET", "/metrics")[2].decode()
        assert s.metric("moemesh_dataplane_device_dispatches_total") == 0
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("name", [n for n in PARITY if "bf16" in n])
def test_a_bf16_wire_gives_the_reference_tokens_of_bf16_checkpoints(binary, tmp_path, name):
    """--wire-dtype bf16 rounds hidden states and partial sums to bf16 on the way (the role
    processes hand the bits over unconverted, see transport/data_plane.h): on the checkpoints that
    are bf16 already, greedy decoding still gives the reference tokens."""
    ref = json.loads((FIXTURES / name / "reference.json").read_text())
    model = fixture_with_tokenizer(tmp_path, name)
    s = start(binary, model, "--transports", "sm", "--expert-workers", 2, "--wire-dtype", "bf16")
    try:
        got = completion_ids(s, ref["prompt_ids"], len(ref["output_ids"]))
        assert got == ref["output_ids"]
    finally:
        assert s.stop() == 0


def auto_placement(cpus, roles):
    """What `serve --cpus auto` gives each role (attention workers first): contiguous blocks, the
    remainder to the first roles; with fewer CPUs than roles, every CPU to every role."""
    cpus = sorted(cpus)
    if len(cpus) < roles:
        return [set(cpus)] * roles
    share, extra = divmod(len(cpus), roles)
    out, at = [], 0
    for r in range(roles):
        take = share + (1 if r < extra else 0)
        out.append(set(cpus[at:at + take]))
        at += take
    return out


def allowed_cpus(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            cpus = set()
            for part in line.split(":", 1)[1].strip().split(","):
                first, _, last = part.partition("-")
                cpus.update(range(int(first), int(last or first) + 1))
            return cpus
    raise AssertionError(f"no Cpus_allowed_list for pid {pid}")


def test_roles_run_as_separate_processes_in_their_own_groups(binary):
    s = start(binary, DEMO)
    try:
        pids = {m["role"]: [] for m in cluster(s)["members"]}
        for m in cluster(s)["members"]:
            pids[m["role"]].append(int(m["pid"]))
        assert len(pids["expert"]) == 2 and len(pids["attention"]) == 1
        names = {}
        for role, ps in pids.items():
            for pid in ps:
                argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                assert argv[:2] == [b"moemesh", role.encode()], argv
                # Each leads its own process group: a signal to serve's group reaches serve alone.
                assert os.getpgid(pid) == pid
                ppid = int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                assert ppid == s.proc.pid
                env = pathlib.Path(f"/proc/{pid}/cmdline").read_text()
                assert TOKEN not in env, "the cluster token is not on the command line"
                names[argv[argv.index(b"--name") + 1].decode()] = pid
                if role == "attention":  # serve's data-plane settings are passed on
                    assert argv[argv.index(b"--dispatch-from-gpu-memory") + 1] == b"auto", argv
        # --cpus auto: every role is bound to its share of the CPUs serve may use.
        want = auto_placement(os.sched_getaffinity(s.proc.pid), 3)
        got = [allowed_cpus(names[n]) for n in ("attention-0", "expert-0", "expert-1")]
        assert got == want, f"role CPUs {got}, expected {want}"
        snap = cluster(s)
        assert snap["ready"] and snap["join"].startswith("127.0.0.1:")
    finally:
        assert s.stop() == 0
    for ps in pids.values():
        for pid in ps:
            assert not pathlib.Path(f"/proc/{pid}").exists() or \
                b"zombie" in pathlib.Path(f"/proc/{pid}/status").read_bytes().lower()


def test_a_wrong_cluster_token_is_refused(binary):
    s = start(binary, DEMO)
    try:
        join = cluster(s)["join"]
        p = subprocess.run([str(binary), "expert", "--join", join, "--model", str(DEMO),
                            "--cluster-token", "wrong", "--join-timeout", "10"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0
        assert "refused" in p.stderr and "wrong cluster token" in p.stderr, p.stderr
        assert cluster(s)["joins_refused_total"] == "1"
        assert len(members(s, "expert")) == 2
    finally:
        s.stop()


PROMPTS = [[1 + i, 7, 42, 99 + i] for i in range(6)]


def reference_outputs(server, n_tokens):
    return [completion_ids(server, p, n_tokens) for p in PROMPTS]


def test_losing_an_expert_worker_with_replicas_fails_nothing(binary):
    s = start(binary, DEMO, "--expert-workers", 2, "--expert-replicas", 2)
    try:
        expected = reference_outputs(s, 1000)
        results, threads = start_streams(s, PROMPTS, 1000, n=2)
        victim = int(members(s, "expert")[0]["pid"])
        # Checked before the kill: the gateway may end the lost streams within milliseconds.
        assert_still_running(results)
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 240  # 8 choices of 1,000 tokens: a minute or two under ASan
        for t in threads:
            t.join(max(0.1, deadline - time.time()))
        assert not any(t.is_alive() for t in threads), "streams still running after 240 s"
        for i, r in results.items():
            assert r["error"] is None, r["error"]
            assert r["finish"] == "length"
            assert r["tokens"] == expected[i]
        assert len(results) == len(PROMPTS)
        wait_until(lambda: len(members(s, "expert")) == 1, 10, "the lost worker to leave")
        assert cluster(s)["ready"]
        assert completion_ids(s, PROMPTS[0], 1000) == expected[0]
    finally:
        s.stop()


def test_losing_an_expert_worker_without_replicas_fails_cleanly_then_the_survivor_takes_over(
        binary):
    s = start(binary, DEMO, "--expert-workers", 2)
    try:
        expected = reference_outputs(s, 32)
        results, threads = start_streams(s, PROMPTS, 1000)
        victim = int(members(s, "expert")[0]["pid"])
        # Checked before the kill: the gateway may end the lost streams within milliseconds.
        assert_still_running(results)
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        for t in threads:
            t.join(max(0.1, killed + 10 - time.time()))
        assert len(results) == len(PROMPTS)
        failed = [r for r in results.values() if r["error"] is not None]
        time.sleep(1.5)  # the router's figures lag by a poll
        missed = (s.metric("moemesh_dataplane_timeouts_total")
                  + s.metric("moemesh_dataplane_send_errors_total"))
        if missed == 0 and not failed:
            # No step needed the lost worker: the survivor bound its experts before the attention
            # worker's next MoE layer (seen in slow builds, e.g. under ASan). Nothing may fail then.
            pass
        else:
            # A step that needed it failed, and with it every sequence in it: all the streams.
            assert len(failed) == len(results), "a request that needed the lost experts must fail"
            for r in failed:
                assert r["end"] - killed < 2.0, f"ended {r['end'] - killed:.2f} s after the kill"
        # The router places the lost worker's experts on the survivor, which binds them: the
        # cluster serves again without a restart, with the same outputs.
        wait_until(lambda: s.request("GET", "/health")[0] == 200, 10, "the cluster to recover")
        survivors = members(s, "expert")
        assert len(survivors) == 1 and survivors[0]["experts_held"] == 4 * 8, survivors
        assert s.request("GET", "/v1/models")[0] == 200
        assert reference_outputs(s, 32) == expected
        # A restarted worker rejoins and takes its share of the experts back.
        join = cluster(s)["join"]
        proc = subprocess.Popen([str(binary), "expert", "--join", join, "--model", str(DEMO),
                                 "--threads", "1", "--name", "restarted"],
                                env={**os.environ, "MOEMESH_CLUSTER_TOKEN": TOKEN},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_until(lambda: any(m["name"] == "restarted" and m["experts_held"] > 0
                                   for m in members(s, "expert")), 30, "the restart to rejoin")
            assert reference_outputs(s, 32) == expected
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
    finally:
        s.stop()


def streams_on_a_stopped_worker(server, attempts=3):
    """Starts four streams over both attention workers and stops (SIGSTOP) the one running more
    of them. Returns the streams, the stopped worker's pid and how many of its requests it had
    not finished: exactly those must fail when it is killed. The router's in-flight counts lag
    the workers (a worker says "done" after its last token, and the client may still be reading
    tokens the worker produced long before), so they are read only once the worker is stopped
    and its last messages have arrived."""
    for attempt in range(attempts):
        results, threads = start_streams(server, PROMPTS[:4], 1000)
        # The router spreads the requests over both workers (fewest in flight first).
        workers = sorted(members(server, "attention"), key=lambda m: -int(m["requests_in_flight"]))
        assert 1 <= int(workers[0]["requests_in_flight"]) <= 3, workers
        # Checked before the stop: the gateway may end the lost streams within milliseconds.
        assert_still_running(results)
        pid = int(workers[0]["pid"])
        os.kill(pid, signal.SIGSTOP)
        time.sleep(1.0)
        victim = [m for m in members(server, "attention") if int(m["pid"]) == pid]
        assert len(victim) == 1, victim
        on_victim = int(victim[0]["requests_in_flight"])
        if on_victim > 0:
            return results, threads, pid, on_victim
        os.kill(pid, signal.SIGCONT)  # it had finished them all: nothing to lose; again
        for t in threads:
            t.join(60)
    pytest.fail(f"in {attempts} attempts, the stopped worker had always finished its requests")


def test_losing_an_attention_worker_fails_only_its_requests(binary):
    s = start(binary, DEMO, "--attention-workers", 2)
    try:
        expected = reference_outputs(s, 1000)
        # The router counts a request as done when the worker says so, just after the response.
        wait_until(lambda: all(m["requests_in_flight"] == "0" for m in members(s, "attention")),
                   5, "the reference requests to be done")
        results, threads, pid, on_victim = streams_on_a_stopped_worker(s)
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        for t in threads:
            t.join(60)
        failed = [r for r in results.values() if r["error"] is not None]
        ok = [(i, r) for i, r in results.items() if r["error"] is None]
        assert len(failed) == on_victim and len(ok) == 4 - on_victim, results
        for r in failed:
            assert r["end"] - killed < 5.0
        for i, r in ok:
            assert r["finish"] == "length" and r["tokens"] == expected[i]
        wait_until(lambda: len(members(s, "attention")) == 1, 10, "the lost worker to leave")
        assert completion_ids(s, PROMPTS[0], 1000) == expected[0]
    finally:
        s.stop()


def expert_totals(server):
    experts = json.loads(server.request("GET", "/admin/experts")[2])
    return (sum(int(e["overflows_total"]) for l in experts["layers"] for e in l["experts"]),
            sum(int(e["drops_total"]) for l in experts["layers"] for e in l["experts"]))


def settled_expert_totals(server, quiet=2.0, timeout=30):
    """(overflows, drops) once they have not changed for `quiet` seconds: the router gathers the
    workers' counters by polling, so they arrive a poll or two after the steps that made them."""
    last, since = expert_totals(server), time.time()
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.2)
        now = expert_totals(server)
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet:
            return last
    pytest.fail(f"the expert counters kept changing for {timeout} s")


def test_capacity_factor_counts_overflows_and_drops(binary):
    s = start(binary, DEMO, "--capacity-factor", 0.3, "--admin-token", "adm")
    try:
        for p in PROMPTS:
            completion_ids(s, p * 8, 4)  # prompts of 32 tokens: prefill steps overflow
        overflows, drops = settled_expert_totals(s)
        assert overflows > 0 and drops > 0
        experts = json.loads(s.request("GET", "/admin/experts")[2])
        assert experts["capacity_factor"] == pytest.approx(0.3)
        # Admin action: no limit again, and then nothing more is dropped. The router passes the
        # setting on to the workers without waiting for them; once a request has run under it,
        # another one adds nothing to either counter.
        assert s.request("POST", "/admin/capacity", {"capacity_factor": 0})[0] in (401, 403)
        status, _, raw = s.request("POST", "/admin/capacity", {"capacity_factor": 0},
                                   headers={"Authorization": "Bearer adm"})
        assert status == 200, raw
        time.sleep(0.3)
        completion_ids(s, PROMPTS[0] * 8, 4)
        before = settled_expert_totals(s)
        completion_ids(s, PROMPTS[1] * 8, 4)
        assert settled_expert_totals(s) == before
    finally:
        s.stop()


def test_a_role_that_cannot_start_ends_serve_with_its_reason(binary):
    p = subprocess.run([str(binary), "serve", "--model", str(DEMO), "--port", "0",
                        "--transports", "no-such-transport"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "failed before the cluster was ready" in p.stderr, p.stderr
    assert "UCX_TLS=no-such-transport" in p.stderr, p.stderr


def test_explicit_role_cpus_bind_each_role_and_the_cluster_serves(binary):
    cpus = sorted(os.sched_getaffinity(0))
    want = [{cpus[0]}, {cpus[-1]}, {cpus[0]}]  # attention-0, expert-0, expert-1
    s = start(binary, DEMO, "--cpus", "|".join(str(min(c)) for c in want))
    try:
        names = {m["name"]: int(m["pid"]) for m in cluster(s)["members"]
                 if m["role"] in ("attention", "expert")}
        got = [allowed_cpus(names[n]) for n in ("attention-0", "expert-0", "expert-1")]
        assert got == want, f"role CPUs {got}, expected {want}"
        assert len(completion_ids(s, [1, 7, 42, 99], 8)) == 8
    finally:
        assert s.stop() == 0


def test_role_cpus_are_checked_before_anything_starts(binary):
    cpus = sorted(os.sched_getaffinity(0))
    p = subprocess.run([str(binary), "serve", "--model", str(DEMO), "--port", "0", "--cpus",
                        f"{cpus[0]}|{cpus[-1]}"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "2 CPU lists for 3 role processes" in p.stderr, p.stderr
    outside = max(cpus) + 1
    p = subprocess.run([str(binary), "serve", "--model", str(DEMO), "--port", "0", "--cpus",
                        f"{cpus[0]}|{cpus[0]}|{outside}"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1
    assert f"CPU {outside} is not one this process may use" in p.stderr, p.stderr
    p = subprocess.run([str(binary), "expert", "--join", "127.0.0.1:1", "--model", str(DEMO),
                        "--cpus", "0-"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "--cpus '0-'" in p.stderr, p.stderr


def test_a_worker_that_cannot_reach_the_router_says_so(binary):
    from server import free_port
    p = subprocess.run([str(binary), "expert", "--join", f"127.0.0.1:{free_port()}",
                        "--model", str(DEMO), "--cluster-token", TOKEN, "--join-timeout", "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "cannot reach the router" in p.stderr and "--join" in p.stderr, p.stderr
    p = subprocess.run([str(binary), "attention", "--join", "nohostport", "--model", str(DEMO)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "expected HOST:PORT" in p.stderr, p.stderr


def test_admin_routes_answer_bad_requests_clearly(binary):
    s = start(binary, DEMO, "--admin-token", "adm")
    try:
        auth = {"Authorization": "Bearer adm"}
        status, _, raw = s.request("POST", "/admin/capacity", {"factor": 1}, headers=auth)
        assert status == 400 and b"capacity_factor" in raw, raw
        status, _, raw = s.request("POST", "/admin/capacity", {"capacity_factor": -1},
                                   headers=auth)
        assert status == 400 and b"out of range" in raw, raw
        assert s.request("GET", "/admin/capacity")[0] == 405
        assert s.request("GET", "/admin/nothing")[0] == 404
    finally:
        s.stop()
