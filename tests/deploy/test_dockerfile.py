"""deploy/docker/Dockerfile, checked statically: the image is not built in CI (no Docker, no
registry). Every stage is named, every COPY source exists and is not left out by the
.dockerignore, the build runs scripts/setup and the same CMake + Ninja build, and the runtime
stage runs as a non-root user with a HEALTHCHECK on /health and moemesh as its entry point."""
import fnmatch
import json
import re
import shlex

import pytest

from deploy_common import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"


def instructions(path):
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def stages():
    """[(name, base, [(INSTRUCTION, args)])] in order."""
    result = []
    for ins, args in instructions(DOCKERFILE):
        if ins == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert m, f"FROM {args}"
            result.append((m.group(2), m.group(1), []))
        elif ins == "ARG" and not result:
            continue
        else:
            assert result, f"{ins} before the first FROM"
            result[-1][2].append((ins, args))
    return result


def test_every_stage_is_named(stages):
    names = [s[0] for s in stages]
    assert all(names), "every FROM has AS NAME"
    assert len(set(names)) == len(names)
    assert names[-1] == "runtime"
    assert {"build", "ucx", "runtime"} <= set(names)


def test_bases_are_known_images(stages):
    by_name = {s[0]: s[1] for s in stages}
    for name, base, _ in stages:
        assert base in by_name or base.startswith("debian:") or base.startswith("nvidia/cuda:"), base
    # The build stage has the CUDA toolkit (from the cuda-devel stage, or an nvidia/cuda devel base).
    chain, base = [], by_name["build"]
    while base in by_name:
        chain.append(base)
        base = by_name[base]
    text = DOCKERFILE.read_text()
    assert "devel" in base or ("cuda-devel" in chain and "cuda-minimal-build" in text)


def copy_sources(args):
    words = shlex.split(args) if not args.startswith("[") else json.loads(args)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def ignored(path, patterns):
    """Docker's .dockerignore rule: the last matching pattern wins; `!` re-includes."""
    result = False
    parts = path.split("/")
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(pre, p) or (p.startswith("**/") and fnmatch.fnmatch(
                pre.split("/")[-1], p[3:])) for pre in prefixes):
            result = not neg
    return result


def test_copy_sources_exist_and_are_in_the_context(stages):
    patterns = [l.strip() for l in DOCKERIGNORE.read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    names = {s[0] for s in stages}
    seen = 0
    for name, _, body in stages:
        for ins, args in body:
            if ins not in ("COPY", "ADD"):
                continue
            assert ins == "COPY", "ADD fetches from the network: use COPY"
            flags, sources, _ = copy_sources(args)
            frm = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
            if frm:
                assert frm[0] in names, f"COPY --from={frm[0]} names no stage"
                continue
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
                assert not ignored(src, patterns), f"COPY {src} is left out by the .dockerignore"
                seen += 1
    assert seen >= 5


def test_the_dockerignore_leaves_out_build_outputs():
    patterns = [l.strip() for l in DOCKERIGNORE.read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    for path in ["build/bin/moemesh", ".venv/bin/python", "tests/fixtures/models",
                 "core/__pycache__/x.pyc", ".git/config"]:
        assert ignored(path, patterns), path


def test_build_stage_builds_as_scripts_setup_does(stages):
    build = {s[0]: s[2] for s in stages}["build"]
    runs = " ".join(a for i, a in build if i == "RUN")
    assert "scripts/setup --no-build" in runs, "the Debian packages and tools of scripts/setup"
    assert re.search(r"cmake -S \. -B build -G Ninja", runs)
    assert "-DMOEMESH_CUDA=ON" in runs
    assert "cmake --build build --target moemesh" in runs


def test_ucx_stage_has_the_production_transports(stages):
    ucx = {s[0]: s[2] for s in stages}["ucx"]
    runs = " ".join(a for i, a in ucx if i == "RUN")
    for flag in ("--with-cuda", "--with-verbs", "--with-rdmacm"):
        assert flag in runs, flag
    args = " ".join(a for i, a in ucx if i == "ARG")
    assert "UCX_TARBALL_URL" in args and "UCX_CONFIGURE_EXTRA" in args


def test_runtime_stage(stages):
    runtime = stages[-1][2]
    kinds = [i for i, _ in runtime]
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    (hc,) = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert "/health" in hc and hc.split("CMD", 1)[0].strip().startswith("--")
    (ep,) = [a for i, a in runtime if i == "ENTRYPOINT"]
    assert json.loads(ep)[-1].endswith("/moemesh"), "ENTRYPOINT runs moemesh (exec form)"
    assert "STOPSIGNAL" in kinds
    runs = " ".join(a for i, a in runtime if i == "RUN")
    assert "libjs-chart.js" in runs, "Chart.js for /console"
    copies = [a for i, a in runtime if i == "COPY"]
    assert any("--from=ucx" in c for c in copies) and any("--from=build" in c for c in copies)
    # Only the binary, its libraries and the demo model come from the build stage.
    from_build = [copy_sources(c)[1] for c in copies if "--from=build" in c]
    assert sorted(s for srcs in from_build for s in srcs) == [
        "/out/bin/moemesh", "/out/lib", "/src/moemesh/models/demo"]


def test_the_runtime_console_assets_match_the_binary_default():
    """The image installs Chart.js where `--console-assets` looks by default."""
    from render_manifests import BINARY
    import subprocess
    if not BINARY.is_file():
        pytest.skip(f"{BINARY} is not built")
    out = subprocess.run([str(BINARY), "gateway", "--help"], capture_output=True, text=True).stdout
    assert "/usr/share/javascript/chart.js" in out
