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
