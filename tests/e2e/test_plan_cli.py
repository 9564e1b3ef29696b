"""`moemesh plan` as users call it: the --json contract of DESIGN.md, the table, and clear errors
for wrong flags and values."""
import json
import subprocess

import pytest

from conftest import FIXTURES, ROOT

CONFIGS = ROOT / "tests" / "fixtures" / "configs"


def run(binary, *args, timeout=60):
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def plan_json(binary, *args):
    p = run(binary, "plan", "--json", *args)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, "--json prints one JSON object"
    return json.loads(lines[0])


def test_json_shape_and_values_for_deepseek_v3(binary):
    js = plan_json(binary, "--config", CONFIGS / "deepseek-v3" / "config.json", "--dtype", "fp8",
                   "--context", 8192)
    for key in ["total_params", "active_params", "active_non_embedding_params", "kv_bytes_per_token",
                "kv_cache_bytes", "activation_bytes", "cuda_context_bytes", "context", "batch"]:
        assert isinstance(js[key], int) and not isinstance(js[key], bool), key
    assert abs(js["total_params"] / 671e9 - 1) < 0.01
    assert abs(js["active_params"] / 37e9 - 1) < 0.05
    assert js["model_type"] == "deepseek_v3" and js["architecture"]["attention"] == "mla"
    assert js["kv_bytes_per_token"] == (512 + 64) * 61 * 2
    assert js["kv_cache_bytes"] == js["kv_bytes_per_token"] * 8192
    assert js["mtp"]["layers"] == 1 and js["mtp"]["counted"] is False and js["mtp"]["params"] > 10e9
    assert set(js["weights_bytes"]) == {"bf16", "fp16", "fp8", "int8", "int4"}
    assert js["weights_bytes"]["bf16"] == 2 * js["total_params"]
    assert js["weights_bytes"]["int4"] < js["weights_bytes"]["fp8"] < js["weights_bytes"]["bf16"]
    assert js["gpu"]["name"] == "H100-80" and js["gpu"]["default"] is True
    plan = js["plan"]
    assert plan["fits"] is True
    assert (plan["gpus"], plan["nodes"], plan["tp"], plan["pp"], plan["ep"]) == (16, 2, 8, 2, 8)
    per_gpu = plan["per_gpu"]
    assert per_gpu["used_bytes"] <= per_gpu["usable_bytes"] < per_gpu["memory_bytes"]
    assert per_gpu["used_bytes"] == sum(per_gpu[k] for k in
                                        ["weights_bytes", "kv_cache_bytes", "activation_bytes", "cuda_context_bytes"])
    assert js["gpus_by_dtype"]["fp8"] == 16 and js["gpus_by_dtype"]["bf16"] > 16


def test_model_dir_counts_the_checkpoint_tensors(binary):
    js = plan_json(binary, "--model", FIXTURES / "mixtral-tiny")
    assert js["checkpoint"]["params"] == js["total_params"]
    assert js["checkpoint"]["files"] == 1
    assert js["plan"]["gpus"] == 1


def test_context_and_batch_grow_the_plan(binary):
    cfg = CONFIGS / "mixtral-8x7b" / "config.json"
    small = plan_json(binary, "--config", cfg, "--context", 4096)
    big = plan_json(binary, "--config", cfg, "--context", 32768, "--batch", 256, "--gpu", "p5")
    assert small["plan"]["gpus"] == 2
    assert big["plan"]["gpus"] > small["plan"]["gpus"]
    assert big["plan"]["nodes"] > 1 and big["gpu"]["gpu"] == "H100-80"


def test_table(binary):
    p = run(binary, "plan", "--config", CONFIGS / "mixtral-8x7b" / "config.json", "--gpu", "a100",
            "--context", 4096)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "total 46.70B" in out and "active 12.88B" in out
    assert "131072 B per token" in out
    assert "2 x A100-80: TP 2 x PP 1, EP 2" in out
    for dtype in ["bf16", "fp16", "fp8", "int8", "int4"]:
        assert dtype in out
    assert "10% headroom" in out


def test_default_gpu_is_said(binary):
    p = run(binary, "plan", "--config", CONFIGS / "dbrx" / "config.json")
    assert p.returncode == 0, p.stderr
    assert "H100-80 (default" in p.stdout


def test_help(binary):
    p = run(binary, "plan", "--help")
    assert p.returncode == 0
    for flag in ["--config", "--model", "--dtype", "--kv-dtype", "--gpu", "--context", "--batch", "--json"]:
        assert flag in p.stdout


@pytest.mark.parametrize("args, needle", [
    (["--no-such-flag"], "--no-such-flag"),
    ([], "--config"),
    (["--dtype", "fp4"], "--dtype"),
    (["--kv-dtype", "int4"], "--kv-dtype"),
    (["--gpu", "V100"], "H100-80"),
    (["--batch", "0"], "--batch"),
])
def test_bad_flags_exit_non_zero_with_a_message(binary, args, needle):
    cfg = [] if args == [] else ["--config", CONFIGS / "mixtral-8x7b" / "config.json"]
    p = run(binary, "plan", *cfg, *args)
    assert p.returncode != 0
    assert needle in p.stderr + p.stdout


def test_config_and_model_exclude_each_other(binary):
    p = run(binary, "plan", "--config", CONFIGS / "dbrx" / "config.json", "--model", FIXTURES / "mixtral-tiny")
    assert p.returncode != 0 and (p.stderr + p.stdout).strip()


def test_unknown_model_type_names_the_file_and_the_supported_ones(binary, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2"}))
    p = run(binary, "plan", "--config", cfg)
    assert p.returncode != 0
    assert str(cfg) in p.stderr and "gpt2" in p.stderr and "deepseek_v3" in p.stderr


def test_missing_config_names_the_path(binary):
    p = run(binary, "plan", "--model", "/nonexistent-model-dir")
    assert p.returncode != 0 and "/nonexistent-model-dir" in p.stderr
