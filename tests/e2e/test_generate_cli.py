"""`moemesh generate` as users call it: the DESIGN.md contract, parity through the CLI, and
clear errors for broken input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES

MODELS = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.json").exists())


def run(binary, *args, timeout=120):
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def reference(name):
    ref = json.loads((FIXTURES / name / "reference.json").read_text())
    return ref, np.load(FIXTURES / name / "reference_logits.npy")


@pytest.mark.parametrize("name", MODELS)
def test_generate_matches_transformers(binary, tmp_path, name):
    ref, logits = reference(name)
    prompt = ref["prompt_ids"]
    out = tmp_path / "logits.npy"
    p = run(binary, "generate", "--model", FIXTURES / name, "--prompt-ids", ",".join(map(str, prompt)),
            "--max-tokens", 16, "--ignore-eos", "--json", "--logits-out", out)
    assert p.returncode == 0, p.stderr
    js = json.loads(p.stdout.strip().splitlines()[-1])
    assert js["prompt_ids"] == prompt
    assert js["output_ids"] == ref["output_ids"]
    assert isinstance(js["text"], str)
    # Its own timing: the prompt's forward pass, then 15 decode steps (the 16th token is sampled
    # from the last step's logits).
    timing = js["timing"]
    assert timing["decode_steps"] == 15
    assert timing["prefill_seconds"] > 0 and timing["decode_seconds"] > 0
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (len(prompt), logits.shape[1])
    assert np.abs(got - logits[: len(prompt)]).max() <= 1e-3


@pytest.mark.parametrize("name", ["mixtral-odd-sharded", "qwen2moe-bf16"])
def test_logits_out_over_the_continuation(binary, tmp_path, name):
    # The whole sequence as a prompt: every row of transformers' logits is compared.
    ref, logits = reference(name)
    seq = ref["prompt_ids"] + ref["output_ids"][:15]
    out = tmp_path / "logits.npy"
    p = run(binary, "generate", "--model", FIXTURES / name, "--prompt-ids", ",".join(map(str, seq)),
            "--max-tokens", 0, "--logits-out", out)
    assert p.returncode == 0, p.stderr
    assert np.abs(np.load(out) - logits).max() <= 1e-3


def test_greedy_is_deterministic_and_sampling_follows_seed(binary):
    model = FIXTURES / "olmoe-tiny"
    args = ["generate", "--model", model, "--prompt-ids", "1,2,3", "--max-tokens", 8, "--ignore-eos", "--json"]
    ids = lambda p: json.loads(p.stdout.splitlines()[-1])["output_ids"]
    a, b = run(binary, *args), run(binary, *args)
    assert ids(a) == ids(b)
    s1 = run(binary, *args, "--temperature", 1.5, "--seed", 7)
    s2 = run(binary, *args, "--temperature", 1.5, "--seed", 7)
    s3 = run(binary, *args, "--temperature", 1.5, "--seed", 8)
    assert ids(s1) == ids(s2)
    assert len(ids(s3)) == 8


def test_eos_from_config_stops_generation(binary, tmp_path):
    ref, _ = reference("mixtral-tiny")
    model = tmp_path / "m"
    shutil.copytree(FIXTURES / "mixtral-tiny", model)
    third = ref["output_ids"][2]
    cfg = json.loads((model / "config.json").read_text())
    cfg["eos_token_id"] = third
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "generation_config.json").unlink()
    prompt = ",".join(map(str, ref["prompt_ids"]))
    js = json.loads(run(binary, "generate", "--model", model, "--prompt-ids", prompt, "--json").stdout.splitlines()[-1])
    first_eos = ref["output_ids"].index(third)
    assert js["output_ids"] == ref["output_ids"][: first_eos + 1]
    assert js["finish_reason"] == "stop"
    js = json.loads(run(binary, "generate", "--model", model, "--prompt-ids", prompt, "--json",
                        "--ignore-eos").stdout.splitlines()[-1])
    assert js["output_ids"] == ref["output_ids"] and js["finish_reason"] == "length"


@pytest.mark.parametrize("args, needle", [
    (["generate", "--no-such-flag"], "no-such-flag"),
    (["generate", "--model", "/nonexistent-model-dir", "--prompt-ids", "1"], "/nonexistent-model-dir"),
    (["generate", "--model", FIXTURES / "olmoe-tiny", "--prompt-ids", "1,x,3"], "--prompt-ids"),
    (["generate", "--model", FIXTURES / "olmoe-tiny", "--prompt-ids", "1,99999"], "99999"),
    (["generate", "--model", FIXTURES / "olmoe-tiny"], "--prompt"),
    (["generate", "--model", FIXTURES / "olmoe-tiny", "--prompt-ids", "1", "--max-tokens", "-3"], "max-tokens"),
    (["generate", "--model", FIXTURES / "olmoe-tiny", "--prompt-ids", "1", "--max-tokens", "100000"],
     "maximum context length"),
    (["serve", "--single-process", "--device", "cuda", "--kv-cache-dtype", "f32", "--model",
      FIXTURES / "olmoe-tiny"], "--kv-cache-dtype f32 needs --device cpu"),
    (["nonsense"], "nonsense"),
    (["nonsense", "--help"], "nonsense"),
])
def test_bad_input_is_a_clear_error(binary, args, needle):
    p = run(binary, *args)
    assert p.returncode > 0, p
    assert needle in p.stderr + p.stdout


def corrupt_copy(tmp_path, name="olmoe-tiny"):
    model = tmp_path / "broken"
    shutil.copytree(FIXTURES / name, model)
    return model


def test_truncated_checkpoint_names_the_file(binary, tmp_path):
    model = corrupt_copy(tmp_path)
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    p = run(binary, "generate", "--model", model, "--prompt-ids", "1")
    assert p.returncode == 1 and "truncated" in p.stderr and str(f) in p.stderr


def test_missing_shard_names_it(binary, tmp_path):
    model = corrupt_copy(tmp_path, "mixtral-odd-sharded")
    shard = sorted(model.glob("model-*.safetensors"))[1]
    shard.unlink()
    p = run(binary, "generate", "--model", model, "--prompt-ids", "1")
    assert p.returncode == 1 and shard.name in p.stderr and "missing" in p.stderr


def test_unknown_architecture_is_named(binary, tmp_path):
    model = corrupt_copy(tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "llama4_moe_xl"
    (model / "config.json").write_text(json.dumps(cfg))
    p = run(binary, "generate", "--model", model, "--prompt-ids", "1")
    assert p.returncode == 1 and "llama4_moe_xl" in p.stderr and "config.json" in p.stderr


def test_shape_disagreeing_with_config_is_named(binary, tmp_path):
    model = corrupt_copy(tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_experts"] = cfg["num_experts"] + 1
    (model / "config.json").write_text(json.dumps(cfg))
    p = run(binary, "generate", "--model", model, "--prompt-ids", "1")
    assert p.returncode == 1 and "mlp.gate.weight" in p.stderr and "num_experts" in p.stderr


def test_missing_config_is_named(binary, tmp_path):
    model = corrupt_copy(tmp_path)
    (model / "config.json").unlink()
    p = run(binary, "generate", "--model", model, "--prompt-ids", "1")
    assert p.returncode == 1 and "config.json" in p.stderr


def test_prompt_text_uses_the_checkpoint_tokenizer(binary):
    demo = FIXTURES.parents[2] / "models" / "demo"
    p = run(binary, "generate", "--model", demo, "--prompt", "The garden was", "--max-tokens", 8,
            "--ignore-eos", "--json")
    assert p.returncode == 0, p.stderr
    js = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(js["output_ids"]) == 8 and js["text"].strip()
    ids = run(binary, "generate", "--model", demo, "--prompt-ids", ",".join(map(str, js["prompt_ids"])),
              "--max-tokens", 8, "--ignore-eos", "--json")
    assert json.loads(ids.stdout.strip().splitlines()[-1])["output_ids"] == js["output_ids"]


def test_prompt_text_without_tokenizer_is_a_clear_error(binary):
    p = run(binary, "generate", "--model", FIXTURES / "olmoe-tiny", "--prompt", "hello")
    assert p.returncode == 1 and "tokenizer.json" in p.stderr and "--prompt-ids" in p.stderr


def test_cpus_binds_the_process_and_sizes_its_pool(binary):
    ref, _ = reference(MODELS[0])
    prompt = ",".join(map(str, ref["prompt_ids"]))
    cpu = max(os.sched_getaffinity(0))
    p = run(binary, "--log-level", "info", "generate", "--model", FIXTURES / MODELS[0],
            "--prompt-ids", prompt, "--max-tokens", 16, "--ignore-eos", "--json", "--cpus", cpu)
    assert p.returncode == 0, p.stderr
    assert f"threads=1 cpus={cpu} " in p.stderr, p.stderr  # --threads 0: one per CPU
    assert json.loads(p.stdout.strip().splitlines()[-1])["output_ids"] == ref["output_ids"]
    p = run(binary, "generate", "--model", FIXTURES / MODELS[0], "--prompt-ids", prompt,
            "--cpus", max(os.sched_getaffinity(0)) + 1)
    assert p.returncode == 1
    assert "is not one this process may use" in p.stderr, p.stderr


@pytest.mark.parametrize("preset", ["small", "deepseek-v2-lite"])
def test_synthetic_checkpoints_load_and_generate(binary, tmp_path, preset):
    # tools/make_synthetic_model.py, shrunk: what the benchmarks and scripts/gpu-check write.
    tool = FIXTURES.parents[2] / "tools" / "make_synthetic_model.py"
    out = tmp_path / preset
    p = subprocess.run([sys.executable, str(tool), str(out), "--preset", preset, "--layers", "3",
                        "--hidden", "256", "--experts", "8", "--moe-intermediate", "128"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    config = json.loads((out / "config.json").read_text())
    if preset == "deepseek-v2-lite":
        assert config["model_type"] == "deepseek_v2"
        assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["q_lora_rank"]) == (512, 64, None)
        assert config["rope_scaling"]["type"] == "yarn"
    else:
        assert config["model_type"] == "qwen3_moe"
    logits = tmp_path / "logits.npy"
    g = run(binary, "generate", "--model", out, "--prompt-ids", "3,40,500,7", "--max-tokens", 4,
            "--ignore-eos", "--json", "--logits-out", logits)
    assert g.returncode == 0, g.stderr
    js = json.loads(g.stdout.strip().splitlines()[-1])
    assert len(js["output_ids"]) == 4
    lg = np.load(logits)
    assert lg.shape == (4, config["vocab_size"]) and np.isfinite(lg).all()
