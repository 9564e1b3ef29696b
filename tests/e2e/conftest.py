import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "models"


@pytest.fixture(scope="session")
def binary():
    path = pathlib.Path(os.environ.get("MOEMESH_BINARY", ROOT / "build" / "bin" / "moemesh"))
    if not path.exists():
        pytest.fail(f"{path} is not built; run scripts/setup")
    return path


def fixture_with_tokenizer(tmp_path, name):
    """A parity fixture plus a tokenizer (the gateway needs one; prompts here are token ids)."""
    d = tmp_path / name
    d.mkdir()
    for f in (FIXTURES / name).iterdir():
        (d / f.name).symlink_to(f)
    (d / "tokenizer.json").symlink_to(ROOT / "models" / "demo" / "tokenizer.json")
    return d
