"""Each worked example stores the `moemesh plan` output it was sized from; it must be what the
planner prints today."""
import pytest

import render_manifests as rm
from deploy_common import EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_stored_plan_is_current(name):
    if rm.plan_command(name) is None:
        pytest.skip(f"{name} has no plan")
    if not rm.BINARY.is_file():
        pytest.skip(f"{rm.BINARY} is not built")
    stored = rm.plan_file(name).read_text(encoding="utf-8")
    assert stored == rm.plan_output(name), (
        f"{rm.plan_file(name)} is out of date: run tools/render_manifests.py --update-plans")


def test_plans_fit_their_nodes():
    """The plan of each example fits the GPUs the example runs on (plan line: N x GPU)."""
    expected = {"mixtral-8x7b": ("p5", 1), "deepseek-v3": ("p5", 2), "kimi-k2.5-int4": ("p5", 1)}
    for name, (gpu, nodes) in expected.items():
        text = rm.plan_file(name).read_text(encoding="utf-8")
        assert f"--gpu {gpu}" in text.splitlines()[0]
        assert "does not fit" not in text
        (plan,) = [line for line in text.splitlines() if line.startswith("plan ")]
        assert f"({nodes} node{'s' if nodes > 1 else ''} of 8)" in plan, plan
