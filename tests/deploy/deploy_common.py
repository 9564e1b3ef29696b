"""Paths and the renderer module (tools/render_manifests.py) of the deployment tests."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import render_manifests  # noqa: E402

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
YAMLLINT_CONFIG = K8S / "yamllint.yaml"
EXAMPLES = render_manifests.examples()
