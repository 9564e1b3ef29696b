"""Fixtures of the deployment tests."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_common import EXAMPLES, render_manifests  # noqa: E402


@pytest.fixture(scope="session")
def rendered():
    """Every example, rendered once: {name: [objects]}."""
    return {name: render_manifests.render(name) for name in EXAMPLES}
