"""The cluster as separate hosts: deploy/local/netns-cluster puts every node in its own network
namespace (router + gateway, one attention worker, two expert workers) on a private /24 behind a
bridge, with the data plane on UCX over TCP between the namespaces.

Greedy tokens through that cluster must equal the parity fixture's reference; every member must
sit on its own address and really run inside its own namespace; the data plane must cross the
bridge; and `down` must leave no namespace, link or process behind, whatever happened before.
Skipped where network namespaces cannot be made (not root, or an unprivileged container).
"""
import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import FIXTURES, ROOT, fixture_with_tokenizer

SCRIPT = ROOT / "deploy" / "local" / "netns-cluster"
FIXTURE = "qwen2moe-tiny"


def running(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            return b"zombie" not in f.read().lower()
    except FileNotFoundError:
        return False


def netns_unavailable():
    """Why network namespaces, veth links and bridges cannot be made here, or None if they can."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if shutil.which("curl") is None:
        return "curl is not installed (netns-cluster waits for /health with it)"
    probe = f"mmprobe{os.getpid()}"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return (f"cannot create a network namespace (euid {os.geteuid()}): `ip netns add` says "
                f"{p.stderr.strip()!r}; needs root or CAP_NET_ADMIN+CAP_SYS_ADMIN")
    try:
        for args in (["link", "add", "pv0", "type", "veth", "peer", "name", "pv1"],
                     ["link", "add", "pbr", "type", "bridge"]):
            p = subprocess.run(["ip", "-n", probe, *args], capture_output=True, text=True)
            if p.returncode != 0:
                return (f"cannot create veth links or bridges: `ip {' '.join(args)}` says "
                        f"{p.stderr.strip()!r}")
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def free_subnet():
    """A 10.213.X /24 that nothing in the root namespace uses (a unique one per test run)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout + \
        subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    free = [x for x in range(64, 250) if f"10.213.{x}." not in used]
    assert free, "no free 10.213.X/24 subnet"
    return f"10.213.{random.choice(free)}"


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local bridge


def get(url, body=None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with NO_PROXY.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def ours(prefix):
    """The namespaces and links of this prefix that exist now."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = [l.split(": ")[1].split("@")[0] for l in links.splitlines() if ": " in l]
    return [n for n in ns + names if n.startswith(prefix + "-")]


def netns_inode(path):
    """The network namespace behind /proc/PID/ns/net or /run/netns/NAME (same inode = same ns)."""
    return os.stat(path).st_ino


def counter(link, what):
    return int(open(f"/sys/class/net/{link}/statistics/{what}_bytes").read())


def tcp_peers(ns):
    """Peer IPs of the established TCP connections inside namespace ns."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htn", "state", "established"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def dump_logs(state):
    for log in sorted((state / "logs").glob("*.log")) if (state / "logs").exists() else []:
        print(f"----- {log.name}\n{log.read_text()[-4000:]}", file=sys.stderr)


def test_netns_cluster_separate_hosts_greedy_output_equals_the_reference(binary, tmp_path):
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    ref = json.loads((FIXTURES / FIXTURE / "reference.json").read_text())
    model = fixture_with_tokenizer(tmp_path, FIXTURE)
    config = json.loads((model / "config.json").read_text())
    prefix = f"mt{os.getpid() % 100000}"
    subnet = free_subnet()
    state = tmp_path / "state"
    env = {**os.environ, "MOEMESH_NETNS_PREFIX": prefix, "MOEMESH_NETNS_STATE": str(state),
           "MOEMESH_NETNS_SUBNET": subnet}
    env.pop("MOEMESH_CLUSTER_TOKEN", None)  # the script makes a random one
    assert not ours(prefix), f"namespaces or links of prefix {prefix} exist before the test"
    pids = {}
    try:
        up = subprocess.run([str(SCRIPT), "up", "--model", str(model), "--binary", str(binary),
                             "--experts", "2", "--threads", "1", "--timeout", "45"],
                            env=env, capture_output=True, text=True, timeout=90)
        assert up.returncode == 0, up.stdout + up.stderr
        settings = dict(l.split("=", 1) for l in (state / "env").read_text().splitlines())
        url = settings["URL"]
        assert url == f"http://{subnet}.2:8000", url
        for f in (state / "pids").glob("*.pid"):
            pids[f.stem] = int(f.read_text().split()[0])
        assert sorted(pids) == ["attention0", "expert0", "expert1", "gateway", "router"]
        assert url in up.stdout and all(str(p) in up.stdout for p in pids.values()), up.stdout

        # Greedy tokens through the namespaces equal transformers' reference.
        attn_link, exp_links = f"{prefix}-a0", [f"{prefix}-e0", f"{prefix}-e1"]

        def bytes_now():
            return {l: counter(l, "tx") + counter(l, "rx") for l in [attn_link, *exp_links]}
        status, raw = get(url + "/v1/models")
        assert status == 200, raw
        model_id = json.loads(raw)["data"][0]["id"]
        body = {"model": model_id, "prompt": ref["prompt_ids"],
                "max_tokens": len(ref["output_ids"]), "temperature": 0, "logprobs": 0,
                "return_tokens_as_token_ids": True, "ignore_eos": True}
        before = bytes_now()
        started = time.time()
        status, raw = get(url + "/v1/completions", body)
        assert status == 200, raw
        tokens = json.loads(raw)["choices"][0]["logprobs"]["tokens"]
        took = time.time() - started
        after = bytes_now()
        assert [int(t.split(":", 1)[1]) for t in tokens] == ref["output_ids"]

        # The data plane crossed the bridge: every step sends each MoE layer's hidden states
        # (f32) from the attention worker to the expert workers and gets as many values back, so
        # the expert workers' links carry at least twice that beyond their idle control traffic
        # (heartbeats), measured over as long again right after.
        grown = {l: after[l] - before[l] for l in before}
        time.sleep(min(took, 5.0))
        idle = {l: v - after[l] for l, v in bytes_now().items()}
        moe_layers = config["num_hidden_layers"] - len(config.get("mlp_only_layers", []))
        floor = 2 * len(ref["output_ids"]) * moe_layers * config["hidden_size"] * 4
        what = f"bytes during the completion {grown}, idle {idle}, data-plane floor {floor}"
        assert sum(grown[l] - idle[l] for l in exp_links) >= floor, what
        assert all(grown[l] > idle[l] for l in exp_links), what
        attn_ip = f"{subnet}.20"
        for i, l in enumerate(exp_links):
            assert attn_ip in tcp_peers(f"{prefix}-exp{i}"), \
                f"no data-plane connection from the attention worker into {prefix}-exp{i}"

        # Every member on its own address, and really inside its own namespace.
        status, raw = get(url + "/admin/cluster")
        assert status == 200, raw
        snap = json.loads(raw)
        assert snap["ready"] and snap["join"] == f"{subnet}.2:7100", snap
        members = snap["members"]
        assert sorted(m["role"] for m in members) == ["attention", "expert", "expert"], members
        hosts = [m["directory"].rsplit(":", 1)[0] for m in members]
        assert len(set(hosts)) == len(hosts), f"members share an address: {hosts}"
        expected_ns = {f"{subnet}.20": f"{prefix}-attn0", f"{subnet}.100": f"{prefix}-exp0",
                       f"{subnet}.101": f"{prefix}-exp1"}
        assert set(hosts) == set(expected_ns), hosts
        for m, host in zip(members, hosts):
            ns = expected_ns[host]
            assert netns_inode(f"/proc/{m['pid']}/ns/net") == netns_inode(f"/run/netns/{ns}"), \
                f"{m['name']} (pid {m['pid']}) is not in namespace {ns}"
            if shutil.which("unshare"):  # its own UTS namespace, named after the network one
                assert m["host"] == ns, m
        for role in ("router", "gateway"):
            assert netns_inode(f"/proc/{pids[role]}/ns/net") == \
                netns_inode(f"/run/netns/{prefix}-router"), role
        assert {int(m["pid"]) for m in members} == \
            {pids["attention0"], pids["expert0"], pids["expert1"]}
    except BaseException:
        dump_logs(state)
        raise
    finally:
        for f in (state / "pids").glob("*.pid") if (state / "pids").exists() else []:
            pids.setdefault(f.stem, int(f.read_text().split()[0]))  # also after a partial up
        down = subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, text=True,
                              timeout=60)
        left = ours(prefix)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not left, f"down left namespaces or links behind: {left}"
        deadline = time.time() + 5
        for name, pid in pids.items():
            while running(pid) and time.time() < deadline:
                time.sleep(0.05)
            assert not running(pid), f"{name} (pid {pid}) still runs after down"
        assert not state.exists(), "down removes its state directory"
