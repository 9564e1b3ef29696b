"""The operations console of a running cluster: /admin/cluster and /admin/experts against their
JSON schemas, the per-expert token counts of /admin/experts, /metrics, `moemesh top` and the
/console page agreeing after a load run, a killed worker showing as lost within seconds, and the
page itself in headless Chromium (it lists every actor, its heatmap follows traffic, an admin
action takes effect); screenshots go to build/test-artifacts/console (or $MOEMESH_ARTIFACTS).
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest

from conftest import ROOT
from server import Server
from clients import stream

DEMO = ROOT / "models" / "demo"
ADMIN = "console-admin-token"
SCHEMAS = ROOT / "docs" / "schemas"
ARTIFACTS = pathlib.Path(os.environ.get("MOEMESH_ARTIFACTS", ROOT / "build" / "test-artifacts"))


def get(server, path):
    status, _, raw = server.request("GET", path)
    assert status == 200, (path, raw)
    return json.loads(raw)


def wait_until(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def start_cluster(binary):
    s = Server(binary, "--model", DEMO, "--expert-workers", 2, "--admin-token", ADMIN,
               "--expert-metrics", -1)
    s.model_id = get(s, "/v1/models")["data"][0]["id"]
    wait_until(lambda: get(s, "/admin/cluster")["ready"], 30, "the cluster to be ready")
    return s


def load(server, streams=6, tokens=24):
    results = {}
    threads = [threading.Thread(target=stream,
                                args=(server, f"Chapter {i}. It was a truth", tokens, results, i))
               for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r["finish"] == "length" and not r["error"] for r in results.values()), results


def expert_totals(experts):
    return {(e["layer"], e["expert"]): int(e["tokens_total"])
            for layer in experts["layers"] for e in layer["experts"]}


def metric_totals(server):
    _, _, body = server.request("GET", "/metrics")
    out = {}
    pattern = re.compile(r'^moemesh_expert_tokens_total\{[^}]*layer="(\d+)",expert="(\d+)"\} (\d+)$')
    for line in body.decode().splitlines():
        m = pattern.match(line)
        if m:
            out[(int(m.group(1)), int(m.group(2)))] = int(m.group(3))
    return out


def top_totals(binary, server):
    p = subprocess.run([str(binary), "top", "--url", server.base, "--once", "--experts", "-1"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    out = {}
    rows = False
    for line in p.stdout.splitlines():
        if line.startswith("LAYER  EXPERT"):
            rows = True
            continue
        if rows and line.strip():
            f = line.split()
            out[(int(f[0]), int(f[1]))] = int(f[2])
    return out, p.stdout


def settled_totals(server):
    """/admin/experts once two consecutive snapshots agree (the router polls every 500 ms)."""
    previous = None
    for _ in range(50):
        now = expert_totals(get(server, "/admin/experts"))
        if now == previous and sum(now.values()) > 0:
            return now
        previous = now
        time.sleep(0.6)
    pytest.fail("the per-expert counts did not settle")


def test_admin_json_matches_its_schemas_and_every_count_agrees(binary):
    jsonschema = pytest.importorskip("jsonschema")
    s = start_cluster(binary)
    try:
        load(s)
        cluster = get(s, "/admin/cluster")
        experts = get(s, "/admin/experts")
        jsonschema.validate(cluster, json.loads((SCHEMAS / "admin-cluster.schema.json").read_text()))
        jsonschema.validate(experts, json.loads((SCHEMAS / "admin-experts.schema.json").read_text()))
        roles = sorted(a["role"] for a in cluster["actors"])
        assert roles == ["attention", "expert", "expert", "gateway", "router"], roles
        assert all(a["state"] == "up" for a in cluster["actors"]), cluster["actors"]
        assert all(int(a["messages_handled"]) > 0 for a in cluster["actors"]), cluster["actors"]
        assert len({a["node"] for a in cluster["actors"]}) == 4, "gateway+router, 3 workers"
        # A schema that could not fail would prove nothing: a broken snapshot is refused.
        broken = dict(cluster, actors=[dict(cluster["actors"][0], state="sleeping")])
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken,
                                json.loads((SCHEMAS / "admin-cluster.schema.json").read_text()))

        totals = settled_totals(s)
        # Every token of every MoE layer went to top_k experts (demo: 2 of 8), prompts included.
        per_layer = {}
        for (layer, _), n in totals.items():
            per_layer[layer] = per_layer.get(layer, 0) + n
        assert len(set(per_layer.values())) == 1, per_layer
        wait_until(lambda: metric_totals(s) == totals, 5, "/metrics to agree with /admin/experts")
        top, screen = top_totals(binary, s)
        assert top == totals, screen
        assert "expert-0" in screen and "attention-0" in screen and "router" in screen, screen
        _, _, body = s.request("GET", "/metrics")
        text = body.decode()
        for series in ("moemesh_layer_balancedness{", "moemesh_worker_load{",
                       "moemesh_expert_overflow_total{", "moemesh_expert_dropped_total{",
                       "moemesh_dataplane_round_trip_seconds_count{"):
            assert series in text, series
        round_trips = [float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                       if l.startswith("moemesh_dataplane_round_trip_seconds_count{")]
        assert round_trips and round_trips[0] > 0
    finally:
        s.stop()


def test_a_killed_expert_worker_shows_as_lost_within_seconds(binary):
    s = start_cluster(binary)
    try:
        victim = next(m for m in get(s, "/admin/cluster")["members"] if m["name"] == "expert-1")
        os.kill(int(victim["pid"]), signal.SIGKILL)
        start = time.time()

        def shown():
            actors = {a["name"]: a["state"] for a in get(s, "/admin/cluster")["actors"]}
            return actors.get("expert-1") in ("lost", "unreachable")

        wait_until(shown, 5, "the killed worker to show as lost")
        assert time.time() - start < 5
        _, screen = top_totals(binary, s)
        assert re.search(r"expert-1\s+(lost|unreachable)", screen), screen
    finally:
        s.stop()


def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium needs Debian's chromium and chromium-driver "
                    "(scripts/setup installs them)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1600"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_console_in_headless_chromium(binary):
    s = start_cluster(binary)
    out = ARTIFACTS / "console"
    out.mkdir(parents=True, exist_ok=True)
    b = browser()
    try:
        from selenium.webdriver.common.by import By
        b.get(s.base + "/console")
        names = {a["name"] for a in get(s, "/admin/cluster")["actors"]}

        # The page redraws every second: read the DOM in one script call, never through element
        # handles that a redraw makes stale.
        def listed():
            return set(b.execute_script(
                "return [...document.querySelectorAll('tr.actor')].map(e => e.dataset.name)"
            )) >= names

        wait_until(listed, 15, f"the page to list every actor {names}")
        assert b.execute_script("return typeof Chart") == "function", "Chart.js was not served"

        def heat():
            cells = b.execute_script(
                "return [...document.querySelectorAll('#heatmap td.cell')]"
                ".map(c => [c.dataset.layer, c.dataset.expert, c.dataset.total])")
            return {(int(layer), int(expert)): int(total) for layer, expert, total in cells}

        wait_until(lambda: len(heat()) == 4 * 8, 15, "the heatmap (4 layers x 8 experts)")
        before = sum(heat().values())
        b.save_screenshot(str(out / "1-started.png"))

        load(s)
        totals = settled_totals(s)
        wait_until(lambda: heat() == totals, 10, "the heatmap to show the new token counts")
        assert sum(heat().values()) > before
        b.save_screenshot(str(out / "2-after-traffic.png"))

        # Admin actions from the page: the capacity factor, then draining a worker.
        b.find_element(By.ID, "admin-token").send_keys(ADMIN)
        field = b.find_element(By.ID, "capacity-input")
        field.clear()
        field.send_keys("1.5")
        b.find_element(By.ID, "capacity-button").click()
        wait_until(lambda: get(s, "/admin/cluster")["capacity_factor"] == 1.5, 10,
                   "the capacity factor set from the page")
        text_of = lambda id_: b.execute_script(  # noqa: E731
            f"return document.getElementById('{id_}').textContent")
        wait_until(lambda: "HTTP 200" in text_of("admin-result"), 5, "the page to show the answer")
        wait_until(lambda: "1.50" in text_of("capacity"), 5,
                   "the header to show the new capacity factor")
        # The options are redrawn every second (the page keeps the chosen value): choose by script.
        b.execute_script("document.getElementById('drain-select').value = 'expert-1'")
        assert b.execute_script("return document.getElementById('drain-select').value") == \
            "expert-1"
        b.find_element(By.ID, "drain-button").click()

        def drained():
            states = {m["name"]: m["state"] for m in get(s, "/admin/cluster")["members"]}
            return states.get("expert-1") == "drained"

        wait_until(drained, 15, "expert-1 drained from the page")
        wait_until(lambda: b.execute_script(
            "const e = document.querySelector('tr.actor[data-name=\"expert-1\"]');"
            "return e ? e.dataset.state : null") == "drained", 5, "the page to show it drained")
        b.save_screenshot(str(out / "3-after-admin-actions.png"))
        # Requests still complete with every expert on the remaining worker.
        load(s, streams=2, tokens=8)
    finally:
        b.quit()
        s.stop()
