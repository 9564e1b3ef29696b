"""Secrets and listening addresses, from outside the process: the API key, the admin token and the
cluster token never appear in any role's output even at --log-level debug; keys that differ only
in length or in their last byte are refused; the HTTP port listens on --host and the router's
control port on loopback, as docs/security.md states; a data-plane peer without the cluster token
is refused by a real expert worker."""
import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import ROOT
from server import free_port

DEMO = ROOT / "models" / "demo"
API_KEY = "sk-test-9f3b2c71e4d84a0c"
ADMIN_TOKEN = "adm-test-51d0e7a9c3b24f68"
CLUSTER_TOKEN = "cluster-test-7e2a94c1b0d35f86"


def request(port, method, path, body=None, headers=None):
    import urllib.error
    import urllib.request
    data = json.dumps(body).encode() if body is not None else None
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers=h)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def listening(port):
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on `port`."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hexport, 16) == port:
                out.add(addr)
    return out


LOOPBACK = "0100007F"  # 127.0.0.1 in /proc/net/tcp's byte order
LOOPBACK6 = {"00000000000000000000000001000000",  # ::1
             "0000000000000000FFFF00000100007F"}  # ::ffff:127.0.0.1


def listening_of(pid):
    """Local (address, port) of every listening TCP socket that process `pid` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                addr, hexport = fields[1].rsplit(":", 1)
                out.add((addr, int(hexport, 16)))
    return out


@pytest.fixture(scope="module")
def cluster(binary, tmp_path_factory):
    """`moemesh serve` (a cluster: gateway+router, 1 attention, 2 expert workers) at debug level
    with every secret set, its whole output captured."""
    log_path = tmp_path_factory.mktemp("security") / "serve.log"
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(binary), "serve", "--log-level", "debug", "--port", str(port), "--model", str(DEMO),
         "--api-key", API_KEY, "--admin-token", ADMIN_TOKEN, "--cluster-token", CLUSTER_TOKEN],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, open(log_path, "rb").read()[-4000:]
        try:
            if request(port, "GET", "/health")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("moemesh serve did not become healthy in 120 s")
    yield {"proc": proc, "port": port, "log": log_path}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.close()


def test_api_key_is_checked_whatever_its_length(cluster):
    port = cluster["port"]
    body = {"model": "demo", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    status, raw = request(port, "POST", "/v1/completions", body,
                          {"Authorization": "Bearer " + API_KEY})
    assert status == 200, raw
    for wrong in ("", API_KEY[:-1], API_KEY + "x", API_KEY[:-1] + "X", "x" * 4096):
        status, raw = request(port, "POST", "/v1/completions", body,
                              {"Authorization": "Bearer " + wrong})
        assert status == 401, (wrong, raw)
        assert json.loads(raw)["error"]["type"] == "AuthenticationError"
    status, _ = request(port, "POST", "/v1/completions", body)  # no header at all
    assert status == 401
    # Refusals are counted.
    _, metrics = request(port, "GET", "/metrics")
    line = [x for x in metrics.decode().splitlines()
            if x.startswith("moemesh_requests_rejected_total{") and 'reason="auth"' in x]
    assert line and float(line[0].rsplit(" ", 1)[1]) >= 6


def test_admin_token_is_checked(cluster):
    port = cluster["port"]
    for wrong in (ADMIN_TOKEN[:-1], ADMIN_TOKEN + "0", API_KEY):
        status, _ = request(port, "POST", "/admin/capacity", {"capacity_factor": 0},
                            {"Authorization": "Bearer " + wrong})
        assert status == 401, wrong
    status, raw = request(port, "POST", "/admin/capacity", {"capacity_factor": 0},
                          {"Authorization": "Bearer " + ADMIN_TOKEN})
    assert status == 200, raw


def test_http_and_control_ports_listen_on_loopback(cluster):
    assert listening(cluster["port"]) == {LOOPBACK}
    status, raw = request(cluster["port"], "GET", "/admin/cluster")
    assert status == 200, raw
    join = json.loads(raw)["join"]
    host, control = join.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert listening(int(control)) == {LOOPBACK}


def test_every_role_listens_on_loopback_only(cluster):
    """serve's roles run on this machine: the HTTP port (--host), the control ports (--bind-host)
    and UCX's TCP transport (--net-devices lo) all listen on loopback, nothing on 0.0.0.0."""
    status, raw = request(cluster["port"], "GET", "/admin/cluster")
    assert status == 200, raw
    pids = [cluster["proc"].pid] + [int(m["pid"]) for m in json.loads(raw)["members"]]
    assert len(pids) >= 4  # serve, 1 attention and 2 expert workers
    seen = 0
    for pid in pids:
        for addr, port in listening_of(pid):
            seen += 1
            assert addr == LOOPBACK or addr in LOOPBACK6, (pid, addr, port)
    assert seen >= 2  # at least the HTTP and the control port


def metric(port, name, label):
    _, raw = request(port, "GET", "/metrics")
    for line in raw.decode().splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} with {label} is not in /metrics")


def probe(address, *args):
    exe = os.environ.get("MOEMESH_PROBE")
    assert exe and os.path.exists(exe), "MOEMESH_PROBE must name the built dataplane_probe"
    hidden = json.loads((DEMO / "config.json").read_text())["hidden_size"]
    return subprocess.run([exe, "--address", address, "--hidden", str(hidden), *args],
                          capture_output=True, text=True, timeout=60)


def test_a_data_plane_peer_without_the_cluster_token_is_refused(cluster):
    """A process outside the cluster that reaches an expert worker's data plane (here with the
    address the worker logs at debug level) gets an error for a dispatch without the token or with
    a wrong one; the worker counts it, and one with the token is served."""
    port = cluster["port"]
    wait_until = time.time() + 30
    while True:
        text = open(cluster["log"], "rb").read().decode(errors="replace")
        addresses = re.findall(r"event=data_plane_listening address=([0-9a-f]+)", text)
        if len(addresses) >= 2 or time.time() > wait_until:
            break
        time.sleep(0.2)
    assert len(addresses) == 2, "the two expert workers log their data-plane address"
    before = metric(port, "moemesh_dataplane_auth_failures_total", 'side="expert"')
    for args in ((), ("--token", CLUSTER_TOKEN[:-1] + "x"), ("--token", "wrong")):
        p = probe(addresses[0], *args)
        assert p.returncode == 3, (args, p.stdout, p.stderr)
        assert "authentication" in p.stdout and "--cluster-token" in p.stdout, p.stdout
    p = probe(addresses[0], "--token", CLUSTER_TOKEN)
    assert p.returncode == 0 and p.stdout.strip() == "served", (p.stdout, p.stderr)
    # The router polls the workers' counters every 500 ms.
    deadline = time.time() + 10
    while metric(port, "moemesh_dataplane_auth_failures_total", 'side="expert"') < before + 3:
        assert time.time() < deadline, "the refused dispatches are not counted in /metrics"
        time.sleep(0.2)
    # The cluster still serves.
    body = {"model": "demo", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    status, raw = request(port, "POST", "/v1/completions", body,
                          {"Authorization": "Bearer " + API_KEY})
    assert status == 200, raw


def test_no_secret_in_any_output_at_debug_level(cluster):
    port = cluster["port"]
    # Traffic that would log a secret if anything did: requests with it, wrong ones, admin calls.
    request(port, "POST", "/v1/completions", {"model": "demo", "prompt": "Hi", "max_tokens": 2},
            {"Authorization": "Bearer " + API_KEY})
    request(port, "POST", "/admin/capacity", {"capacity_factor": 0},
            {"Authorization": "Bearer " + ADMIN_TOKEN})
    proc = cluster["proc"]
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)
    output = open(cluster["log"], "rb").read()
    # The workers' debug lines are there (so the check below covers them too).
    assert b" debug transport=server event=started" in output, output[-2000:]
    assert b" debug transport=client event=connected" in output, output[-2000:]
    for secret in (API_KEY, ADMIN_TOKEN, CLUSTER_TOKEN):
        assert secret.encode() not in output, f"{secret} appears in the output of moemesh serve"
