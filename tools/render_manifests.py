#!/usr/bin/env python3
"""Renders and validates the Kubernetes manifests of deploy/k8s.

    tools/render_manifests.py --list                       the examples
    tools/render_manifests.py EXAMPLE [--image IMG]        one example as multi-document YAML
    tools/render_manifests.py --all --out DIR              every example, DIR/EXAMPLE.yaml
    tools/render_manifests.py --validate [EXAMPLE ...]     render and validate (all by default)
    tools/render_manifests.py --update-plans               rerun `moemesh plan` for the examples

Layout (kustomize-like; kustomize itself is not needed):

    deploy/k8s/base/base.yaml          `resources` (files of the base) and `prometheusRule` (the
                                       PrometheusRule made from deploy/prometheus's rule file)
    deploy/k8s/examples/NAME/overlay.yaml
        base: ../../base               the base folder
        namespace: NS                  set on every namespaced object; a Namespace is emitted
        image: REPO/moemesh:TAG        replaces the image of every moemesh container
        resources: [file.yaml, ...]    more objects, from the example's folder
        patches:                       strategic-merge patches, matched by kind and name
          - {kind: K, name: N, patch: {...}}
        plan: {args: [...], output: plan.txt}   the `moemesh plan` run stored next to it

Merging: mappings merge key by key; lists of mappings that all have a `name` (containers, env,
ports, volumes, volumeMounts) merge item by item on `name`, new names appended; any other list,
and any scalar, is replaced; a `null` value deletes the key.

Validation (--validate): every built-in object against the Kubernetes OpenAPI schemas of
kubernetes-validate (offline, strict: unknown fields are errors) for each version in
K8S_VERSIONS; the LeaderWorkerSet, ServiceMonitor and PrometheusRule against the JSON schemas of
deploy/k8s/schemas (the LeaderWorkerSet's pod templates as core/v1 PodTemplates); then
cross-object checks (selectors, references, ports, $(VAR) expansions, no Secret expanded into
a command line, the expert pods' grace period above --drain-timeout, role flags against
`moemesh ROLE --help` when the binary is built). Exit status 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "deploy" / "k8s"
EXAMPLES_DIR = K8S_DIR / "examples"
SCHEMAS_DIR = K8S_DIR / "schemas"
BINARY = Path(os.environ.get("MOEMESH_BINARY", ROOT / "build" / "bin" / "moemesh"))

# Kubernetes versions the manifests are validated against: the oldest the examples support
# (LeaderWorkerSet, NetworkPolicy endPort, HPA v2 and PDB v1 are all GA there) and a recent one.
K8S_VERSIONS = ("1.29.0", "1.33.0")

CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole",
                  "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass"}

# Objects the manifests use that an operator creates (docs/deploy.md), not rendered here.
# api-key is optional: an overlay that requires an API key sets the gateway's MOEMESH_API_KEY
# from it.
EXTERNAL_SECRETS = {"moemesh-cluster-token": {"token", "admin-token", "api-key"}}

# An expert worker drains on SIGTERM for up to --drain-timeout seconds (this default when the
# flag is not given); its pod's terminationGracePeriodSeconds must exceed that by this margin,
# so that the worker leaves by itself before the SIGKILL.
EXPERT_DRAIN_TIMEOUT_DEFAULT_S = 60.0
EXPERT_DRAIN_MARGIN_S = 10.0

# apiVersion, kind -> JSON schema file of deploy/k8s/schemas.
CRD_SCHEMAS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-leaderworkerset-x-k8s-io-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-coreos-com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-coreos-com-v1.json",
}

DEFAULT_IMAGE = "moemesh:latest"
INSTANCE_LABEL = "app.kubernetes.io/instance"


class RenderError(Exception):
    pass


# --- loading and merging ----------------------------------------------------------------------

def load_yaml_docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict):
            raise RenderError(f"{path}: a document is not a mapping")
    return docs


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and value and all(
        isinstance(i, dict) and "name" in i for i in value)


def merge(base: Any, patch: Any) -> Any:
    """Strategic-merge subset: see the module docstring."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if _named_list(base) and _named_list(patch):
        out = [copy.deepcopy(i) for i in base]
        index = {i["name"]: n for n, i in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def examples() -> list[str]:
    return sorted(p.parent.name for p in EXAMPLES_DIR.glob("*/overlay.yaml"))


def example_dir(name: str) -> Path:
    d = EXAMPLES_DIR / name
    if not (d / "overlay.yaml").is_file():
        raise RenderError(f"unknown example {name!r}; known: {', '.join(examples())}")
    return d


def prometheus_rule(spec: dict, base_dir: Path) -> dict:
    rules_file = (base_dir / spec["rulesFile"]).resolve()
    rules = load_yaml(rules_file)
    if not isinstance(rules, dict) or not isinstance(rules.get("groups"), list):
        raise RenderError(f"{rules_file}: no `groups` list")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": spec["name"], "labels": dict(spec.get("labels", {}))},
        "spec": {"groups": rules["groups"]},
    }


def _pod_specs(obj: dict) -> Iterable[tuple[str, dict]]:
    """(where, pod template) of a workload object."""
    kind = obj.get("kind")
    spec = obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        yield "spec.template", spec.get("template", {})
    elif kind == "Job":
        yield "spec.template", spec.get("template", {})
    elif kind == "LeaderWorkerSet":
        lwt = spec.get("leaderWorkerTemplate", {})
        if "leaderTemplate" in lwt:
            yield "spec.leaderWorkerTemplate.leaderTemplate", lwt["leaderTemplate"]
        yield "spec.leaderWorkerTemplate.workerTemplate", lwt.get("workerTemplate", {})


def render(name: str, image: str | None = None) -> list[dict]:
    d = example_dir(name)
    overlay = load_yaml(d / "overlay.yaml") or {}
    base_dir = (d / overlay.get("base", "../../base")).resolve()
    base = load_yaml(base_dir / "base.yaml")
    objs: list[dict] = []
    for f in base.get("resources", []):
        objs += load_yaml_docs(base_dir / f)
    if "prometheusRule" in base:
        objs.append(prometheus_rule(base["prometheusRule"], base_dir))
    for f in overlay.get("resources", []):
        objs += load_yaml_docs(d / f)

    for p in overlay.get("patches", []):
        hits = [i for i, o in enumerate(objs)
                if o.get("kind") == p["kind"] and o.get("metadata", {}).get("name") == p["name"]]
        if len(hits) != 1:
            raise RenderError(f"{d / 'overlay.yaml'}: patch {p['kind']}/{p['name']} matches "
                              f"{len(hits)} objects")
        objs[hits[0]] = merge(objs[hits[0]], p["patch"])

    namespace = overlay.get("namespace")
    image = image or overlay.get("image")
    for o in objs:
        meta = o.setdefault("metadata", {})
        meta.setdefault("labels", {})[INSTANCE_LABEL] = name
        if namespace and o.get("kind") not in CLUSTER_SCOPED:
            meta["namespace"] = namespace
        for _, tmpl in _pod_specs(o):
            tmpl.setdefault("metadata", {}).setdefault("labels", {})[INSTANCE_LABEL] = name
            if image:
                for c in tmpl.get("spec", {}).get("containers", []):
                    if c.get("image") == DEFAULT_IMAGE:
                        c["image"] = image
    if namespace:
        objs.insert(0, {"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": namespace, "labels": {
                            "app.kubernetes.io/part-of": "moemesh", INSTANCE_LABEL: name}}})
    return objs


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)


def dump(objs: list[dict]) -> str:
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         explicit_start=True, width=88)


# --- validation -------------------------------------------------------------------------------

def _k8s_validate(obj: dict, version: str) -> list[str]:
    try:
        import kubernetes_validate
    except ImportError:
        raise RenderError("--validate needs kubernetes-validate: run with the Python of .venv "
                          "(scripts/setup installs requirements.txt)") from None

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return [f"Kubernetes {version}: {path or '(top)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"Kubernetes {version}: {e.message}"]
    return []


def _crd_validate(obj: dict, schema_file: str) -> list[str]:
    import jsonschema

    schema = json.loads((SCHEMAS_DIR / schema_file).read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = []
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
        path = ".".join(str(p) for p in e.path)
        errors.append(f"schema {schema_file}: {path or '(top)'}: {e.message}")
    return errors


def validate_schemas(objs: list[dict], versions: Iterable[str] = K8S_VERSIONS) -> list[str]:
    """Schema problems, as 'Kind/name: message' lines (empty when every object is valid)."""
    problems = []
    for obj in objs:
        ref = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in CRD_SCHEMAS:
            problems += [f"{ref}: {m}" for m in _crd_validate(obj, CRD_SCHEMAS[key])]
            for where, tmpl in _pod_specs(obj):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": obj.get("metadata", {}).get("name", "x")},
                           "template": tmpl}
                for v in versions:
                    problems += [f"{ref}: {where}: {m}" for m in _k8s_validate(wrapped, v)]
        else:
            for v in versions:
                problems += [f"{ref}: {m}" for m in _k8s_validate(obj, v)]
    return problems


def _selects(selector: dict, labels: dict) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        have = e["key"] in labels
        op = e["operator"]
        if op == "In" and (not have or labels[e["key"]] not in e["values"]):
            return False
        if op == "NotIn" and have and labels[e["key"]] in e["values"]:
            return False
        if op == "Exists" and not have:
            return False
        if op == "DoesNotExist" and have:
            return False
    return True


_role_flags_cache: dict[str, set[str] | None] = {}


def role_flags(role: str) -> set[str] | None:
    """The flags `moemesh ROLE --help` lists, or None when the binary is not built."""
    if role not in _role_flags_cache:
        if not BINARY.is_file():
            _role_flags_cache[role] = None
        else:
            out = subprocess.run([str(BINARY), role, "--help"], capture_output=True, text=True,
                                 check=False)
            if out.returncode != 0:
                _role_flags_cache[role] = set()
            else:
                _role_flags_cache[role] = set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))
    return _role_flags_cache[role]


def _resolve(value: str, container: dict, configmaps: dict[str, dict]) -> str:
    """A command-line value with its $(VAR)s expanded from the container's plain env values and
    its ConfigMaps (envFrom); a variable it cannot resolve stays as it is."""
    env: dict[str, str] = {}
    for ef in container.get("envFrom", []):
        cm = configmaps.get(ef.get("configMapRef", {}).get("name"))
        if cm is not None:
            env.update({k: str(v) for k, v in cm.get("data", {}).items()})
    env.update({e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e})
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)),
                  str(value))


def check_consistency(objs: list[dict]) -> list[str]:
    """Cross-object problems that a schema cannot see."""
    problems = []
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    pods = []  # (owner ref, template)
    for o in objs:
        for where, tmpl in _pod_specs(o):
            pods.append((f"{o['kind']}/{o['metadata']['name']}", o, tmpl))
    configmaps = by_kind.get("ConfigMap", {})

    for ref, owner, tmpl in pods:
        labels = tmpl.get("metadata", {}).get("labels", {})
        sel = owner.get("spec", {}).get("selector")
        if sel is not None and not _selects(sel, labels):
            problems.append(f"{ref}: selector does not select its own pod template")
        spec = tmpl.get("spec", {})
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in by_kind.get("PersistentVolumeClaim", {}):
                problems.append(f"{ref}: volume {v['name']}: no PersistentVolumeClaim {claim}")
            if claim == "moemesh-models" and not v["persistentVolumeClaim"].get("readOnly"):
                problems.append(f"{ref}: the model volume must be mounted read-only")
        for c in spec.get("containers", []):
            cref = f"{ref} container {c['name']}"
            env_names = {e["name"] for e in c.get("env", [])}
            for ef in c.get("envFrom", []):
                cm = ef.get("configMapRef", {}).get("name")
                if cm:
                    if cm not in configmaps:
                        problems.append(f"{cref}: no ConfigMap {cm}")
                    else:
                        env_names |= set(configmaps[cm].get("data", {}))
            for e in c.get("env", []):
                sk = e.get("valueFrom", {}).get("secretKeyRef")
                if sk:
                    keys = EXTERNAL_SECRETS.get(sk["name"])
                    if keys is None and sk["name"] not in by_kind.get("Secret", {}):
                        problems.append(f"{cref}: env {e['name']}: unknown Secret {sk['name']}")
                    elif keys is not None and sk["key"] not in keys:
                        problems.append(f"{cref}: env {e['name']}: Secret {sk['name']} has no "
                                        f"key {sk['key']}")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{cref}: volumeMount {m['name']}: no such volume")
                elif "persistentVolumeClaim" in volumes[m["name"]] and \
                        volumes[m["name"]]["persistentVolumeClaim"].get("claimName") == \
                        "moemesh-models" and not m.get("readOnly"):
                    problems.append(f"{cref}: the model volume must be mounted read-only")
            port_names = {p.get("name") for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe)
                if not p:
                    continue
                for kind in ("httpGet", "tcpSocket"):
                    port = p.get(kind, {}).get("port")
                    if isinstance(port, str) and port not in port_names:
                        problems.append(f"{cref}: {probe} names port {port}, not declared")
            args = [str(a) for a in c.get("args", [])]
            secret_env = {e["name"] for e in c.get("env", [])
                          if "secretKeyRef" in e.get("valueFrom", {})}
            for a in args + [str(x) for x in c.get("command", [])]:
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
                    if var not in env_names:
                        problems.append(f"{cref}: $({var}) is not in the container's environment")
                    elif var in secret_env:
                        problems.append(f"{cref}: $({var}) puts a Secret on the command line: "
                                        f"the roles read it from their environment")
            if c.get("image", "").rsplit(":", 1)[0].endswith("moemesh") and args and \
                    args[0] == "expert":
                drain = EXPERT_DRAIN_TIMEOUT_DEFAULT_S
                if "--drain-timeout" in args[1:-1]:
                    value = _resolve(args[args.index("--drain-timeout") + 1], c, configmaps)
                    try:
                        drain = float(value)
                    except ValueError:
                        problems.append(f"{cref}: --drain-timeout {value} is not a number")
                grace = spec.get("terminationGracePeriodSeconds", 30)
                if not grace > drain + EXPERT_DRAIN_MARGIN_S:
                    problems.append(f"{ref}: terminationGracePeriodSeconds {grace} does not cover "
                                    f"the expert worker's --drain-timeout {drain:g} plus "
                                    f"{EXPERT_DRAIN_MARGIN_S:g} s")
            if c.get("image", "").rsplit(":", 1)[0].endswith("moemesh") and args:
                role = args[0]
                flags = role_flags(role)
                if flags is not None:
                    if not flags:
                        problems.append(f"{cref}: `moemesh {role} --help` fails: unknown role")
                    for a in args[1:]:
                        if a.startswith("--") and a.split("=", 1)[0] not in flags:
                            problems.append(f"{cref}: moemesh {role} has no flag {a}")
            res = c.get("resources", {})
            gpu_req = res.get("requests", {}).get("nvidia.com/gpu")
            gpu_lim = res.get("limits", {}).get("nvidia.com/gpu")
            if gpu_req is not None and str(gpu_req) != str(gpu_lim):
                problems.append(f"{cref}: nvidia.com/gpu requests and limits differ")
            efa_req = res.get("requests", {}).get("vpc.amazonaws.com/efa")
            if efa_req is not None and str(efa_req) != str(res.get("limits", {}).get(
                    "vpc.amazonaws.com/efa")):
                problems.append(f"{cref}: vpc.amazonaws.com/efa requests and limits differ")

    def pods_selected(selector: dict) -> list[tuple[str, dict, dict]]:
        return [p for p in pods if _selects(selector, p[2].get("metadata", {}).get("labels", {}))]

    for name, svc in by_kind.get("Service", {}).items():
        sel = svc["spec"].get("selector", {})
        matched = pods_selected({"matchLabels": sel})
        if not matched:
            problems.append(f"Service/{name}: selects no pod")
        for port in svc["spec"].get("ports", []):
            tp = port.get("targetPort", port["port"])
            for ref, _, tmpl in matched:
                cports = [p for c in tmpl["spec"]["containers"] for p in c.get("ports", [])]
                if not any(p.get("name") == tp or p.get("containerPort") == tp for p in cports):
                    problems.append(f"Service/{name}: port {port['name']}: {ref} has no "
                                    f"container port {tp}")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for name, o in by_kind.get(kind, {}).items():
            sel = o["spec"].get("selector") if kind == "PodDisruptionBudget" else \
                o["spec"].get("podSelector")
            if not pods_selected(sel):
                problems.append(f"{kind}/{name}: selects no pod")
    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        t = hpa["spec"]["scaleTargetRef"]
        target = by_kind.get(t["kind"], {}).get(t["name"])
        if target is None:
            problems.append(f"HorizontalPodAutoscaler/{name}: no {t['kind']} {t['name']}")
        elif hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            problems.append(f"HorizontalPodAutoscaler/{name}: minReplicas > maxReplicas")
        elif not (hpa["spec"].get("minReplicas", 1) <= target["spec"].get("replicas", 1)
                  <= hpa["spec"]["maxReplicas"]):
            problems.append(f"HorizontalPodAutoscaler/{name}: {t['kind']} {t['name']} starts "
                            f"outside [minReplicas, maxReplicas]")
    for name, sm in by_kind.get("ServiceMonitor", {}).items():
        svcs = [s for s in by_kind.get("Service", {}).values()
                if _selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        if not svcs:
            problems.append(f"ServiceMonitor/{name}: selects no Service")
        for ep in sm["spec"].get("endpoints", []):
            if not any(p.get("name") == ep.get("port") for s in svcs for p in s["spec"]["ports"]):
                problems.append(f"ServiceMonitor/{name}: no Service port {ep.get('port')}")
    # The members' NetworkPolicy must open every port the workers and the router listen on.
    members = by_kind.get("NetworkPolicy", {}).get("moemesh-members")
    if members is not None:
        allowed = []
        for rule in members["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                allowed.append((p["port"], p.get("endPort", p["port"])))
        for ref, _, tmpl in pods_selected(members["spec"]["podSelector"]):
            for c in tmpl["spec"]["containers"]:
                for p in c.get("ports", []):
                    if not any(lo <= p["containerPort"] <= hi for lo, hi in allowed):
                        problems.append(f"NetworkPolicy/moemesh-members: {ref} listens on "
                                        f"{p['containerPort']}, which it does not open")
    cm = configmaps.get("moemesh-settings")
    if cm is not None and "UCX_TCP_PORT_RANGE" in cm.get("data", {}) and members is not None:
        lo, hi = (int(x) for x in cm["data"]["UCX_TCP_PORT_RANGE"].split("-"))
        if not any(a <= lo and hi <= b for a, b in allowed):
            problems.append("NetworkPolicy/moemesh-members does not open UCX_TCP_PORT_RANGE")
    return problems


def validate(objs: list[dict], versions: Iterable[str] = K8S_VERSIONS) -> list[str]:
    problems = validate_schemas(objs, versions)
    try:
        problems += check_consistency(objs)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if not problems:
            raise
        # Objects that fail their schema may not have the shape the cross-checks read.
        problems.append(f"cross-object checks stopped on the invalid objects: {e!r}")
    return problems


# --- plans ------------------------------------------------------------------------------------

def plan_command(name: str) -> list[str] | None:
    overlay = load_yaml(example_dir(name) / "overlay.yaml") or {}
    if "plan" not in overlay:
        return None
    return ["moemesh", "plan"] + [str(a) for a in overlay["plan"]["args"]]


def plan_output(name: str) -> str:
    """What the stored plan file of an example should hold: the command line, then its output."""
    cmd = plan_command(name)
    if cmd is None:
        raise RenderError(f"example {name} has no plan")
    if not BINARY.is_file():
        raise RenderError(f"{BINARY} is not built (scripts/setup)")
    out = subprocess.run([str(BINARY)] + cmd[1:], capture_output=True, text=True, cwd=ROOT,
                         check=False)
    if out.returncode != 0:
        raise RenderError(f"{shlex.join(cmd)} failed: {out.stderr.strip()}")
    return f"$ {shlex.join(cmd)}\n{out.stdout}"


def plan_file(name: str) -> Path:
    overlay = load_yaml(example_dir(name) / "overlay.yaml") or {}
    return example_dir(name) / overlay["plan"].get("output", "plan.txt")


# --- command line -----------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("examples", nargs="*", help="examples to render (default with --validate: all)")
    ap.add_argument("--list", action="store_true", help="list the examples")
    ap.add_argument("--all", action="store_true", help="every example")
    ap.add_argument("--image", help="image of the moemesh containers (default: the overlay's)")
    ap.add_argument("--out", type=Path, help="write DIR/EXAMPLE.yaml instead of stdout")
    ap.add_argument("--validate", action="store_true", help="validate instead of printing")
    ap.add_argument("--k8s-version", action="append",
                    help=f"Kubernetes version to validate against (default: {', '.join(K8S_VERSIONS)})")
    ap.add_argument("--update-plans", action="store_true",
                    help="rerun `moemesh plan` and rewrite each example's stored plan")
    args = ap.parse_args(argv)

    try:
        if args.list:
            print("\n".join(examples()))
            return 0
        names = args.examples or (examples() if args.all or args.validate or args.update_plans
                                  else [])
        if not names:
            ap.error("name an example, or --all (see --list)")
        for n in names:
            example_dir(n)
        if args.update_plans:
            for n in names:
                if plan_command(n) is not None:
                    plan_file(n).write_text(plan_output(n), encoding="utf-8")
                    print(f"wrote {plan_file(n).relative_to(ROOT)}")
            return 0
        if args.validate:
            failed = 0
            for n in names:
                problems = validate(render(n, args.image), args.k8s_version or K8S_VERSIONS)
                for p in problems:
                    print(f"{n}: {p}")
                print(f"{n}: {'ok' if not problems else f'{len(problems)} problem(s)'}",
                      file=sys.stderr)
                failed += bool(problems)
            return 1 if failed else 0
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            for n in names:
                (args.out / f"{n}.yaml").write_text(dump(render(n, args.image)), encoding="utf-8")
            return 0
        sys.stdout.write("".join(dump(render(n, args.image)) for n in names))
        return 0
    except RenderError as e:
        print(f"render_manifests: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
