"""The Kubernetes manifests of deploy/k8s: every example renders, every object is valid against the
Kubernetes schemas (kubernetes-validate, offline) or the CRD schemas of deploy/k8s/schemas, the
objects agree with each other, and a broken object is rejected."""
import copy
import json
import shutil
import subprocess
import sys

import jsonschema
import pytest
import yaml

import render_manifests as rm
from deploy_common import DEPLOY, EXAMPLES, K8S, ROOT, YAMLLINT_CONFIG


def objects_of(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind, name):
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def containers(obj):
    return [c for _, t in rm._pod_specs(obj) for c in t["spec"]["containers"]]


def arg_value(objs, container, flag, default=None):
    """The value of FLAG on a container's command line, its $(VAR)s expanded from the ConfigMaps
    and plain env values; DEFAULT when the flag is not there."""
    args = [str(a) for a in container["args"]]
    if flag not in args:
        return default
    configmaps = {o["metadata"]["name"]: o for o in objects_of(objs, "ConfigMap")}
    return rm._resolve(args[args.index(flag) + 1], container, configmaps)


def test_the_three_worked_examples_are_there():
    assert set(EXAMPLES) >= {"mixtral-8x7b", "deepseek-v3", "kimi-k2.5-int4"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_is_valid(rendered, name):
    problems = rm.validate(rendered[name])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_has_every_part(rendered, name):
    objs = rendered[name]
    kinds = {(o["apiVersion"], o["kind"]) for o in objs}
    for k in [("v1", "Namespace"), ("v1", "ConfigMap"), ("v1", "PersistentVolumeClaim"),
              ("apps/v1", "Deployment"), ("v1", "Service"),
              ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
              ("autoscaling/v2", "HorizontalPodAutoscaler"), ("policy/v1", "PodDisruptionBudget"),
              ("networking.k8s.io/v1", "NetworkPolicy"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
              ("monitoring.coreos.com/v1", "PrometheusRule")]:
        assert k in kinds, k
    ns = objects_of(objs, "Namespace")[0]["metadata"]["name"]
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == ns, o["metadata"]["name"]
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == name

    # The roles, as docs/cluster.md starts a multi-node cluster: a router, a gateway joining it,
    # attention workers (LeaderWorkerSet) and expert workers (Deployment) joining it.
    roles = {c["args"][0] for o in objs for c in containers(o)}
    assert roles == {"router", "gateway", "attention", "expert"}
    for o in objs:
        for c in containers(o):
            if c["args"][0] != "router":
                join = c["args"][c["args"].index("--join") + 1]
                assert join == "moemesh-router:7100"
            env = {e["name"]: e for e in c.get("env", [])}
            token = env["MOEMESH_CLUSTER_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert token == {"name": "moemesh-cluster-token", "key": "token"}
            # Secrets reach the roles through their environment, never their command lines.
            for flag in ("--cluster-token", "--admin-token", "--api-key"):
                assert flag not in c["args"], f"{flag} never goes on a command line"
            secret_env = {n for n, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
            for a in c["args"]:
                assert not any(f"$({n})" in str(a) for n in secret_env), a

    # The gateway reads the admin token from $MOEMESH_ADMIN_TOKEN (--admin-token's default).
    gw_env = {e["name"]: e for e in containers(one(objs, "Deployment", "moemesh-gateway"))[0]["env"]}
    assert gw_env["MOEMESH_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "moemesh-cluster-token", "key": "admin-token"}

    # Model files from a read-only-many claim, mounted read-only everywhere.
    pvc = one(objs, "PersistentVolumeClaim", "moemesh-models")
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]

    # One GPU per attention and expert pod; none for the router and the gateway.
    lws = one(objs, "LeaderWorkerSet", "moemesh-attention")
    expert = one(objs, "Deployment", "moemesh-expert")
    for o in (lws, expert):
        for c in containers(o):
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for n in ("moemesh-router", "moemesh-gateway"):
        for c in containers(one(objs, "Deployment", n)):
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {})

    # Probes: /health decides readiness of the gateway; TCP probes on the roles' control ports.
    gw = containers(one(objs, "Deployment", "moemesh-gateway"))[0]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/health"
    for o, port in ((one(objs, "Deployment", "moemesh-router"), "join"), (lws, "control"),
                    (expert, "control")):
        for c in containers(o):
            for p in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[p]["tcpSocket"]["port"] == port

    # SIGTERM: the gateway's grace period covers --shutdown-grace and the preStop pause.
    grace = float(gw["args"][gw["args"].index("--shutdown-grace") + 1])
    gw_pod = one(objs, "Deployment", "moemesh-gateway")["spec"]["template"]["spec"]
    assert gw_pod["terminationGracePeriodSeconds"] > grace + 5
    # An expert worker drains itself on SIGTERM for at most --drain-timeout seconds: no preStop
    # hook, no admin token, and a grace period that covers the drain with a margin.
    ex_pod = expert["spec"]["template"]["spec"]
    (ex,) = containers(expert)
    drain = float(arg_value(objs, ex, "--drain-timeout", rm.EXPERT_DRAIN_TIMEOUT_DEFAULT_S))
    assert drain > 0, "a drained worker's experts move before it leaves"
    assert ex_pod["terminationGracePeriodSeconds"] > drain + rm.EXPERT_DRAIN_MARGIN_S
    assert "preStop" not in ex.get("lifecycle", {})
    ex_env = {e["name"] for e in ex["env"]}
    assert not ex_env & {"MOEMESH_ADMIN_TOKEN", "MOEMESH_DRAIN_WAIT_S"}, ex_env

    # The router rebalances the pool by load on a schedule (0 turns it off) and above a
    # balancedness threshold; spare copies for the hottest experts are a number.
    (router,) = containers(one(objs, "Deployment", "moemesh-router"))
    assert float(arg_value(objs, router, "--rebalance-interval", "0")) >= 0
    assert 0 <= float(arg_value(objs, router, "--rebalance-threshold", "0.9")) <= 1
    assert int(arg_value(objs, router, "--redundant-experts", "0")) >= 0


@pytest.mark.parametrize("name", EXAMPLES)
def test_expert_pool_autoscaling(rendered, name):
    objs = rendered[name]
    hpa = one(objs, "HorizontalPodAutoscaler", "moemesh-expert")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "moemesh-expert"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "moemesh_expert_pool_utilisation"
    # A mean utilisation (0-1): a Value target below 1, which the HPA scales by the replicas.
    target = metric["external"]["target"]
    assert target["type"] == "Value"
    assert 0 < parse_quantity(target["value"]) < 1
    # The router waits for the workers that hold every expert: the HPA never goes below them.
    settings = one(objs, "ConfigMap", "moemesh-settings")["data"]
    assert hpa["spec"]["minReplicas"] == int(settings["MOEMESH_MIN_EXPERT_WORKERS"])
    # The adapter rule that serves the metric names the gateway's series.
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())
    (rule,) = rules["rules"]["external"]
    assert rule["name"]["as"] == "moemesh_expert_pool_utilisation"
    assert rule["seriesQuery"].startswith("moemesh_expert_pool_utilisation{")
    assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]


def parse_quantity(q):
    """A Kubernetes quantity of the plain or milli form (700m, 0.7, 1)."""
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


@pytest.mark.parametrize("name", EXAMPLES)
def test_prometheus_rule_carries_the_alert_file(rendered, name):
    rule = one(rendered[name], "PrometheusRule", "moemesh-alerts")
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "moemesh-alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]


def test_multi_node_examples_use_efa(rendered):
    for name in ("deepseek-v3", "kimi-k2.5-int4"):
        for kind, n in (("LeaderWorkerSet", "moemesh-attention"), ("Deployment", "moemesh-expert")):
            for c in containers(one(rendered[name], kind, n)):
                assert c["resources"]["limits"]["vpc.amazonaws.com/efa"] == "4"
    lws = one(rendered["deepseek-v3"], "LeaderWorkerSet", "moemesh-attention")
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2


def test_extras_are_valid():
    for f in sorted((K8S / "extras").glob("*.yaml")):
        problems = rm.validate_schemas(rm.load_yaml_docs(f))
        assert not problems, f"{f}: " + "\n".join(problems)


def test_crd_schemas_are_json_schemas():
    for f in sorted((K8S / "schemas").glob("*.json")):
        jsonschema.Draft7Validator.check_schema(json.loads(f.read_text()))


# --- a broken object is rejected ----------------------------------------------------------------

def broken(rendered, kind, name, change):
    objs = copy.deepcopy(rendered["mixtral-8x7b"])
    change(one(objs, kind, name))
    return rm.validate(objs)


def test_unknown_field_in_a_builtin_object_is_rejected(rendered):
    def change(o):
        o["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    problems = broken(rendered, "Deployment", "moemesh-gateway", change)
    assert any("imagePullPolcy" in p and "Kubernetes" in p for p in problems), problems


def test_wrong_type_in_a_builtin_object_is_rejected(rendered):
    def change(o):
        o["spec"]["maxReplicas"] = "six"
    problems = broken(rendered, "HorizontalPodAutoscaler", "moemesh-expert", change)
    assert any("maxReplicas" in p for p in problems), problems


def test_broken_leaderworkerset_is_rejected(rendered):
    problems = broken(rendered, "LeaderWorkerSet", "moemesh-attention",
                      lambda o: o["spec"]["leaderWorkerTemplate"].update(size=0, restartPolicy="Sometimes"))
    assert any("size" in p for p in problems) and any("restartPolicy" in p for p in problems)


def test_broken_pod_template_inside_the_leaderworkerset_is_rejected(rendered):
    def change(o):
        o["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["ports"] = [
            {"containerPort": "seven-thousand"}]
    problems = broken(rendered, "LeaderWorkerSet", "moemesh-attention", change)
    assert any("workerTemplate" in p and "containerPort" in p for p in problems), problems


def test_broken_prometheus_rule_and_service_monitor_are_rejected(rendered):
    problems = broken(rendered, "PrometheusRule", "moemesh-alerts",
                      lambda o: o["spec"]["groups"][0]["rules"][0].update({"for": "five minutes"}))
    assert any("five minutes" in p for p in problems), problems
    problems = broken(rendered, "ServiceMonitor", "moemesh-gateway",
                      lambda o: o["spec"]["endpoints"][0].update(scrapeEvery="15s"))
    assert any("scrapeEvery" in p for p in problems), problems


def test_inconsistent_objects_are_rejected(rendered):
    problems = broken(rendered, "Service", "moemesh-router",
                      lambda o: o["spec"]["selector"].update({"app.kubernetes.io/component": "routr"}))
    assert "Service/moemesh-router: selects no pod" in problems
    problems = broken(rendered, "ConfigMap", "moemesh-settings",
                      lambda o: o["data"].pop("MOEMESH_KV_CACHE_GIB"))
    assert any("$(MOEMESH_KV_CACHE_GIB)" in p for p in problems), problems
    problems = broken(rendered, "NetworkPolicy", "moemesh-members",
                      lambda o: o["spec"]["ingress"][0]["ports"].pop(1))
    assert any("7200" in p for p in problems), problems
    problems = broken(rendered, "HorizontalPodAutoscaler", "moemesh-expert",
                      lambda o: o["spec"]["scaleTargetRef"].update(name="moemesh-experts"))
    assert any("no Deployment moemesh-experts" in p for p in problems), problems


def test_a_secret_on_a_command_line_is_rejected(rendered):
    def change(o):
        o["spec"]["template"]["spec"]["containers"][0]["args"] += ["--admin-token",
                                                                   "$(MOEMESH_ADMIN_TOKEN)"]
    problems = broken(rendered, "Deployment", "moemesh-gateway", change)
    assert any("$(MOEMESH_ADMIN_TOKEN) puts a Secret on the command line" in p
               for p in problems), problems


def test_an_expert_grace_period_shorter_than_the_drain_is_rejected(rendered):
    def change(o):
        o["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 150
    problems = broken(rendered, "Deployment", "moemesh-expert", change)
    assert any("does not cover the expert worker's --drain-timeout" in p for p in problems), problems

    def drop_flag(o):
        c = o["spec"]["template"]["spec"]["containers"][0]
        i = c["args"].index("--drain-timeout")
        del c["args"][i:i + 2]
        o["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 60
    problems = broken(rendered, "Deployment", "moemesh-expert", drop_flag)
    assert any("--drain-timeout 60 plus" in p for p in problems), problems


def test_a_flag_the_binary_does_not_know_is_rejected(rendered):
    if rm.role_flags("expert") is None:
        pytest.skip(f"{rm.BINARY} is not built")
    problems = broken(rendered, "Deployment", "moemesh-expert",
                      lambda o: o["spec"]["template"]["spec"]["containers"][0]["args"].append(
                          "--experts-per-worker"))
    assert any("moemesh expert has no flag --experts-per-worker" in p for p in problems), problems


# --- the command line, offline, and yamllint ----------------------------------------------------

def run_tool(*args, prefix=()):
    return subprocess.run([*prefix, sys.executable, str(ROOT / "tools" / "render_manifests.py"),
                           *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_command_line_validates_every_example_offline():
    """kubernetes-validate ships its schemas: no network is needed. Where this process may make
    a network namespace, the check runs in one with no network at all."""
    prefix = ()
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"],
                                                  capture_output=True).returncode == 0:
        prefix = ("unshare", "-n")
    p = run_tool("--validate", prefix=prefix)
    assert p.returncode == 0, p.stdout + p.stderr
    for name in EXAMPLES:
        assert f"{name}: ok" in p.stderr


def test_command_line_renders_parseable_yaml(tmp_path):
    p = run_tool("--all", "--out", str(tmp_path), "--image", "registry.test/moemesh:1")
    assert p.returncode == 0, p.stderr
    for name in EXAMPLES:
        docs = list(yaml.safe_load_all((tmp_path / f"{name}.yaml").read_text()))
        images = {c["image"] for d in docs for c in containers(d)}
        assert images == {"registry.test/moemesh:1"}
    assert run_tool("no-such-example").returncode == 2


def yamllint(*paths):
    return subprocess.run([sys.executable, "-m", "yamllint", "-f", "parsable", "-c",
                           str(YAMLLINT_CONFIG), *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def test_yamllint_sources_and_rendered(tmp_path):
    p = yamllint(K8S, DEPLOY / "prometheus")
    assert p.returncode == 0, p.stdout + p.stderr
    assert run_tool("--all", "--out", str(tmp_path)).returncode == 0
    p = yamllint(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr


def test_yamllint_rejects_a_broken_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  name: y\n"
                   "data:\n   a: 'b'   \n")
    p = yamllint(bad)
    assert p.returncode != 0
    assert "duplication of key" in p.stdout and "trailing spaces" in p.stdout
