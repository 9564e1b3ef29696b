#!/usr/bin/env python3
"""Parity check: transformers (reference) vs the moemesh C++ engine on tiny random MoE checkpoints.

Examples
  # one default-shaped checkpoint per call
  python tools/parity.py --arch mixtral
  # random shapes never seen before, 20 seeds, bf16 storage, sharded files
  python tools/parity.py --arch qwen3_moe --random-shape --seed 100 --count 20 --dtype bfloat16 --shard
  # every family, random shapes
  python tools/parity.py --arch any --random-shape --count 40
  # an existing checkpoint directory (uses its reference.json prompt if there is one)
  python tools/parity.py --model tests/fixtures/models/olmoe-bf16-clip
  # no engine yet: only build the checkpoint and print the reference
  python tools/parity.py --arch olmoe --random-shape --no-binary --keep /tmp/parity
  # check the pure-numpy re-implementation (tools/parity.py:np_forward, reads safetensors
  # exactly as the engine must) against transformers, on all fixtures + random shapes
  python tools/parity.py --self-test --count 20

What is compared (binary contract):
  moemesh generate --model DIR --prompt-ids "1,2,3" --max-tokens 16 --ignore-eos --json --logits-out F.npy
    - last stdout line: {"prompt_ids": [...], "output_ids": [...], "text": "..."}
    - F.npy: float32 [n_prompt, vocab] = logits at every prompt position
  (a) run 1: prompt, 16 tokens      -> output_ids must equal transformers' greedy tokens;
                                       F.npy is also compared with the reference prompt rows
  (b) run 2: prompt + greedy[:15], 1 token -> F.npy must match transformers' logits of one forward
                                       over that sequence: max |diff| <= --atol (1e-3)

One verdict line per model; the exit status is non-zero if any model mismatches.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets offline env vars before importing transformers)

import numpy as np  # noqa: E402
import torch  # noqa: E402

ARCH_NAMES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "dbrx"]
DEEPSEEK = ("deepseek_v2", "deepseek_v3")

# Default (non-random) shapes per family: small but with GQA, several experts, etc.
DEFAULT_SHAPES = {
    "mixtral": dict(vocab_size=211, hidden_size=48, intermediate_size=20, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, num_local_experts=6,
                    num_experts_per_tok=2, rope_theta=1e6, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, max_position_embeddings=256),
    "qwen2_moe": dict(vocab_size=211, hidden_size=48, intermediate_size=36, moe_intermediate_size=14,
                      shared_expert_intermediate_size=28, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=7, num_experts_per_tok=2, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=[1], qkv_bias=True, rope_theta=1e6,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, max_position_embeddings=256),
    "qwen3_moe": dict(vocab_size=211, hidden_size=40, intermediate_size=36, moe_intermediate_size=14,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                      num_experts=7, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[], rope_theta=1e6, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2, max_position_embeddings=256),
    "olmoe": dict(vocab_size=211, hidden_size=48, intermediate_size=18, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=False, clip_qkv=None, tie_word_embeddings=False, bos_token_id=None,
                  pad_token_id=1, eos_token_id=2, max_position_embeddings=256),
    "deepseek_v2": dict(vocab_size=211, hidden_size=48, intermediate_size=30, moe_intermediate_size=10,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2,
                        n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=1.0,
                        kv_lora_rank=12, q_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=6,
                        v_head_dim=10, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        first_k_dense_replace=1, rope_parameters=dict(rope_type="default", rope_theta=1e4),
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, max_position_embeddings=256),
    "deepseek_v3": dict(vocab_size=211, hidden_size=40, intermediate_size=28, moe_intermediate_size=12,
                        num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=5, n_shared_experts=1,
                        n_routed_experts=12, num_experts_per_tok=3, routed_scaling_factor=2.5,
                        kv_lora_rank=14, q_lora_rank=None, qk_nope_head_dim=6, qk_rope_head_dim=8,
                        v_head_dim=7, n_group=3, topk_group=2, norm_topk_prob=True, first_k_dense_replace=1,
                        rope_interleave=True,
                        rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                             original_max_position_embeddings=64, mscale=1.0,
                                             mscale_all_dim=1.0),
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, max_position_embeddings=256),
    "glm4_moe": dict(vocab_size=211, hidden_size=40, intermediate_size=36, moe_intermediate_size=12,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                     n_routed_experts=9, num_experts_per_tok=3, n_group=3, topk_group=2, n_shared_experts=1,
                     first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=1.5, use_qk_norm=True,
                     attention_bias=True,
                     rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5),
                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, max_position_embeddings=256),
    "dbrx": dict(vocab_size=211, d_model=48, n_heads=6, n_layers=2, max_seq_len=256,
                 attn_config=dict(kv_n_heads=2, clip_qkv=3.0, rope_theta=1e4),
                 ffn_config=dict(ffn_hidden_size=14, moe_num_experts=6, moe_top_k=2, moe_normalize_expert_weights=1.0),
                 rope_parameters=dict(rope_type="default", rope_theta=1e4), bos_token_id=1, eos_token_id=2),
}


# --------------------------------------------------------------------------------------
# Random shapes
# --------------------------------------------------------------------------------------
def random_shape(arch: str, seed: int) -> tuple[dict, int]:
    """Random but valid config kwargs for `arch` (deterministic in seed) and a prompt length."""
    r = random.Random(seed * 1000003 + zlib.crc32(arch.encode()))
    if arch in DEEPSEEK:
        return random_deepseek_shape(arch, r)
    if arch == "glm4_moe":
        return random_glm4_moe_shape(r)
    if arch == "dbrx":
        return random_dbrx_shape(r)
    heads = r.choice([1, 2, 3, 4, 5, 6, 8])
    kv = r.choice([d for d in range(1, heads + 1) if heads % d == 0])
    head_dim = r.choice([2, 4, 6, 8, 10, 12, 16, 20, 24])
    explicit_head_dim = arch in ("mixtral", "qwen3_moe") and r.random() < 0.5
    if explicit_head_dim:
        hidden = r.randint(8, 72)  # anything, odd allowed: q_proj is [heads*head_dim, hidden]
    else:
        while heads * head_dim > 96:
            head_dim -= 2
        hidden = heads * head_dim
    experts = r.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16] + [2, 4, 8])
    top_k = r.randint(1, min(experts, 4))
    layers = r.randint(1, 3)
    vocab = r.randint(40, 512)
    tie = r.random() < 0.5
    cfg: dict = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=r.randint(5, 64),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_experts_per_tok=top_k,
        tie_word_embeddings=tie,
        rms_norm_eps=r.choice([1e-5, 1e-6]),
        rope_theta=float(round(10 ** r.uniform(2.0, 6.5), 1)),
        max_position_embeddings=r.choice([64, 128, 4096]),
        bos_token_id=r.choice([None, r.randrange(vocab)]),
        eos_token_id=r.randrange(vocab),
    )
    if explicit_head_dim:
        cfg["head_dim"] = head_dim
    if arch == "mixtral":
        cfg["num_local_experts"] = experts
    else:
        cfg["num_experts"] = experts
    if arch in ("qwen2_moe", "qwen3_moe"):
        cfg["moe_intermediate_size"] = r.randint(3, 48)
        cfg["decoder_sparse_step"] = min(layers, r.choice([1, 1, 1, 2, 3]))
        cfg["mlp_only_layers"] = sorted(i for i in range(layers) if r.random() < 0.3)
        cfg["norm_topk_prob"] = r.random() < 0.5
    if arch == "qwen2_moe":
        cfg["shared_expert_intermediate_size"] = r.randint(3, 64)
        cfg["qkv_bias"] = r.random() < 0.8
    if arch == "olmoe":
        cfg["norm_topk_prob"] = r.random() < 0.5
        cfg["clip_qkv"] = r.choice([None, round(r.uniform(0.5, 4.0), 2)])
        cfg["pad_token_id"] = r.choice([None, r.randrange(vocab)])
    if arch in ("qwen3_moe", "olmoe"):
        cfg["attention_bias"] = r.random() < 0.3
    # Sliding windows shorter than prompt + continuation, so that they matter.
    if arch == "mixtral" and r.random() < 0.3:
        cfg["sliding_window"] = r.randint(2, 12)
    if arch in ("qwen2_moe", "qwen3_moe") and r.random() < 0.3:
        cfg["use_sliding_window"] = True
        cfg["sliding_window"] = r.randint(2, 12)
        cfg["max_window_layers"] = r.randint(0, layers)
    prompt_len = r.choice([1, 2, 3, 5, 8, 8, 8, 11, 13])
    return cfg, prompt_len


def random_deepseek_shape(arch: str, r: random.Random) -> tuple[dict, int]:
    """Random but valid DeepSeek-V2 / V3 config kwargs (multi-head latent attention, grouped routing)."""
    v3 = arch == "deepseek_v3"
    heads = r.choice([1, 2, 3, 4, 5, 6, 8])
    layers = r.randint(1, 3)
    vocab = r.randint(40, 512)
    n_group = r.choice([1, 2, 3, 4])
    group_size = r.choice([2, 3, 4]) if v3 else r.choice([1, 2, 3, 4])
    experts = n_group * group_size
    topk_group = r.randint(1, n_group)
    top_k = r.randint(1, min(4, topk_group * group_size))
    cfg: dict = dict(
        vocab_size=vocab,
        # DeepseekV2Config insists on hidden_size % num_attention_heads == 0 (V3 does not)
        hidden_size=r.randint(8, 72) if v3 else heads * r.randint(2, 12),
        intermediate_size=r.randint(5, 64),
        moe_intermediate_size=r.randint(3, 32),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        n_shared_experts=r.choice([0, 1, 1, 2]) or 1,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        routed_scaling_factor=r.choice([1.0, 1.5, 2.5, 16.0 if v3 else 1.0]),
        # odd for V3 only: V2's complex RoPE needs an even stride (kv_lora_rank + qk_rope_head_dim)
        kv_lora_rank=r.randint(2, 32) if v3 else 2 * r.randint(1, 16),
        q_lora_rank=r.choice([None, r.randint(4, 40)]),
        qk_nope_head_dim=r.choice([2, 4, 6, 8, 12, 16]),
        qk_rope_head_dim=r.choice([2, 4, 6, 8, 16]),
        v_head_dim=r.randint(2, 20),
        first_k_dense_replace=r.randint(0, layers),
        attention_bias=r.random() < 0.3,
        tie_word_embeddings=r.random() < 0.5,
        rms_norm_eps=r.choice([1e-5, 1e-6]),
        max_position_embeddings=r.choice([64, 128, 4096]),
        bos_token_id=r.choice([None, r.randrange(vocab)]),
        eos_token_id=r.randrange(vocab),
    )
    theta = float(round(10 ** r.uniform(2.0, 6.5), 1))
    rope = dict(rope_type="default", rope_theta=theta)
    if r.random() < 0.5:
        rope = dict(rope_type="yarn", rope_theta=theta, factor=r.choice([2.0, 4.0, 8.0, 40.0]),
                    original_max_position_embeddings=r.choice([8, 16, 32, 64]),
                    mscale=r.choice([None, 0.707, 1.0]), mscale_all_dim=r.choice([None, 0.707, 1.0]))
        rope = {k: v for k, v in rope.items() if v is not None}
    cfg["rope_parameters"] = rope
    if v3:
        cfg.update(n_group=n_group, topk_group=topk_group, norm_topk_prob=r.random() < 0.7,
                   rope_interleave=r.random() < 0.7)
    elif n_group > 1 and r.random() < 0.7:
        cfg.update(topk_method="group_limited_greedy", n_group=n_group, topk_group=topk_group)
    else:
        cfg.update(topk_method="greedy")
    prompt_len = r.choice([1, 2, 3, 5, 8, 8, 8, 11, 13])
    return cfg, prompt_len


def random_glm4_moe_shape(r: random.Random) -> tuple[dict, int]:
    """Random but valid GLM-4.5 MoE config kwargs (partial rotary, grouped sigmoid routing, shared experts)."""
    heads = r.choice([1, 2, 3, 4, 5, 6, 8])
    kv = r.choice([d for d in range(1, heads + 1) if heads % d == 0])
    head_dim = r.choice([4, 6, 8, 10, 12, 16, 20, 24])
    explicit_head_dim = r.random() < 0.5
    if explicit_head_dim:
        hidden = r.randint(8, 72)
    else:
        while heads * head_dim > 96:
            head_dim -= 2
        hidden = heads * head_dim
    factors = [f for f in (0.25, 0.5, 0.75, 1.0) if int(head_dim * f) > 0 and int(head_dim * f) % 2 == 0]
    n_group = r.choice([1, 2, 3, 4])
    group_size = r.choice([2, 3, 4])
    experts = n_group * group_size
    topk_group = r.randint(1, n_group)
    top_k = r.randint(1, min(4, topk_group * group_size))
    layers = r.randint(1, 3)
    vocab = r.randint(40, 512)
    cfg: dict = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=r.randint(5, 64),
        moe_intermediate_size=r.randint(3, 32),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        n_shared_experts=r.choice([1, 1, 2]),
        first_k_dense_replace=r.randint(0, layers),
        norm_topk_prob=r.random() < 0.7,
        routed_scaling_factor=r.choice([1.0, 1.5, 2.5]),
        use_qk_norm=r.random() < 0.5,
        attention_bias=r.random() < 0.5,
        rope_parameters=dict(rope_type="default", rope_theta=float(round(10 ** r.uniform(2.0, 6.5), 1)),
                             partial_rotary_factor=r.choice(factors)),
        tie_word_embeddings=r.random() < 0.5,
        rms_norm_eps=r.choice([1e-5, 1e-6]),
        max_position_embeddings=r.choice([64, 128, 4096]),
        bos_token_id=r.choice([None, r.randrange(vocab)]),
        eos_token_id=r.randrange(vocab),
    )
    if explicit_head_dim:
        cfg["head_dim"] = head_dim
    return cfg, r.choice([1, 2, 3, 5, 8, 8, 8, 11, 13])


def random_dbrx_shape(r: random.Random) -> tuple[dict, int]:
    """Random but valid DBRX config kwargs (LayerNorm, fused Wqkv with clip_qkv, fused experts, p-norm)."""
    heads = r.choice([1, 2, 3, 4, 5, 6, 8])
    kv = r.choice([d for d in range(1, heads + 1) if heads % d == 0])
    head_dim = r.choice([2, 4, 6, 8, 10, 12, 16])
    experts = r.choice([1, 2, 3, 4, 6, 8, 12, 16])
    vocab = r.randint(40, 512)
    theta = float(round(10 ** r.uniform(2.0, 6.5), 1))
    cfg: dict = dict(
        vocab_size=vocab,
        d_model=heads * head_dim,
        n_heads=heads,
        n_layers=r.randint(1, 3),
        max_seq_len=r.choice([64, 128, 4096]),
        # transformers 5.24 needs clip_qkv (clamp(None, None) fails) and attn_config.rope_theta
        attn_config=dict(kv_n_heads=kv, clip_qkv=round(r.uniform(0.5, 8.0), 2), rope_theta=theta),
        ffn_config=dict(ffn_hidden_size=r.randint(3, 48), moe_num_experts=experts,
                        moe_top_k=r.randint(1, min(experts, 4)),
                        moe_normalize_expert_weights=r.choice([1.0, 1.0, 2.0, 0.5, 3.0, None])),
        bos_token_id=r.choice([None, r.randrange(vocab)]),
        eos_token_id=r.randrange(vocab),
    )
    # The rotary base the reference uses is the top-level one; without it, the default 10000
    # (the engine must not take attn_config.rope_theta then: the saved config.json has both).
    if r.random() < 0.7:
        cfg["rope_parameters"] = dict(rope_type="default", rope_theta=theta)
    return cfg, r.choice([1, 2, 3, 5, 8, 8, 8, 11, 13])


def describe_cfg(cfg) -> str:
    g = lambda k, d=None: getattr(cfg, k, d)  # noqa: E731
    n_exp = mf._num_experts(cfg)
    head_dim = g("head_dim") or cfg.hidden_size // cfg.num_attention_heads
    inter = cfg.ffn_config.ffn_hidden_size if cfg.model_type == "dbrx" else cfg.intermediate_size
    parts = [f"V={cfg.vocab_size}", f"H={cfg.hidden_size}", f"L={cfg.num_hidden_layers}",
             f"heads={cfg.num_attention_heads}/{cfg.num_key_value_heads}", f"hd={head_dim}",
             f"E={n_exp}", f"k={mf._top_k(cfg)}", f"I={inter}",
             f"theta={cfg.rope_parameters['rope_theta']:g}", f"tied={int(bool(cfg.tie_word_embeddings))}"]
    if g("moe_intermediate_size") is not None:
        parts.append(f"moeI={cfg.moe_intermediate_size}")
    if g("shared_expert_intermediate_size") is not None:
        parts.append(f"sharedI={cfg.shared_expert_intermediate_size}")
    if g("norm_topk_prob") is not None:
        parts.append(f"norm_topk={int(cfg.norm_topk_prob)}")
    if g("decoder_sparse_step") is not None:
        parts.append(f"step={cfg.decoder_sparse_step}")
    if g("mlp_only_layers"):
        parts.append(f"mlp_only={cfg.mlp_only_layers}")
    if g("qkv_bias") is not None:
        parts.append(f"qkv_bias={int(cfg.qkv_bias)}")
    if g("clip_qkv") is not None:
        parts.append(f"clip={cfg.clip_qkv}")
    if cfg.model_type == "glm4_moe":
        parts.append(f"rot={cfg.rope_parameters.get('partial_rotary_factor')} dense={cfg.first_k_dense_replace} "
                     f"shared={cfg.n_shared_experts} groups={cfg.topk_group}/{cfg.n_group} "
                     f"scale={cfg.routed_scaling_factor} qk_norm={int(cfg.use_qk_norm)} "
                     f"bias={int(cfg.attention_bias)}")
    if cfg.model_type == "dbrx":
        parts.append(f"clip={cfg.attn_config.clip_qkv} p={cfg.ffn_config.moe_normalize_expert_weights}")
    if g("kv_lora_rank") is not None:
        parts.append(f"mla=q{cfg.q_lora_rank}/kv{cfg.kv_lora_rank}/nope{cfg.qk_nope_head_dim}/"
                     f"rope{cfg.qk_rope_head_dim}/v{cfg.v_head_dim} dense={cfg.first_k_dense_replace} "
                     f"shared={cfg.n_shared_experts} groups={g('topk_group')}/{g('n_group')} "
                     f"scale={cfg.routed_scaling_factor} rope={cfg.rope_parameters.get('rope_type')}")
    return " ".join(parts)


# The numpy re-implementation: tools/parity_numpy.py
from parity_numpy import load_safetensors_dir, np_forward  # noqa: E402



# --------------------------------------------------------------------------------------
# Binary
# --------------------------------------------------------------------------------------
class BinaryError(RuntimeError):
    pass


def run_binary(binary: str, model_dir: Path, prompt: list[int], max_tokens: int, logits_out: Path,
               extra: list[str], timeout: float) -> dict:
    cmd = [binary, "generate", "--model", str(model_dir), "--prompt-ids", ",".join(map(str, prompt)),
           "--max-tokens", str(max_tokens), "--ignore-eos", "--json", "--logits-out", str(logits_out)] + extra
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BinaryError(f"timeout after {timeout}s: {' '.join(cmd)}")
    if cp.returncode != 0:
        raise BinaryError(f"exit {cp.returncode}: {' '.join(cmd)}\n--- stderr ---\n{cp.stderr[-3000:]}")
    lines = [ln for ln in cp.stdout.splitlines() if ln.strip()]
    if not lines:
        raise BinaryError(f"no stdout: {' '.join(cmd)}\n--- stderr ---\n{cp.stderr[-3000:]}")
    try:
        res = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise BinaryError(f"last stdout line is not JSON ({e}): {lines[-1][:300]!r}")
    if not logits_out.exists():
        raise BinaryError(f"--logits-out file not written: {logits_out}")
    res["_logits"] = np.load(logits_out)
    res["_cmd"] = " ".join(cmd)
    return res


def compare_logits(got: np.ndarray, want: np.ndarray) -> tuple[float, str]:
    if got.shape != want.shape:
        return math.inf, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not np.all(np.isfinite(got)):
        return math.inf, "non-finite values"
    d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    r, c = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(d.max()), f"at [{r},{c}]"


# --------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------
def prepare(args, arch: str, seed: int, work: Path) -> tuple[Path, str, int | None, list[int] | None, dict | None]:
    """Build (or locate) the checkpoint. Returns (dir, label, prompt_len, fixed_prompt, stored_ref)."""
    if args.model:
        d = Path(args.model)
        ref_file = d / "reference.json"
        stored = json.loads(ref_file.read_text()) if ref_file.exists() else None
        prompt = stored["prompt_ids"] if stored else None
        return d, f"model={d}", 8, prompt, stored
    if args.random_shape:
        cfg_kwargs, prompt_len = random_shape(arch, seed)
    else:
        cfg_kwargs, prompt_len = dict(DEFAULT_SHAPES[arch]), 8
    dtype = args.dtype
    if dtype == "random":
        dtype = random.Random(seed * 31 + 7).choice(["float32", "bfloat16"])
    model = mf.build_model(arch, cfg_kwargs, seed)
    name = f"{arch}-s{seed}{'-rand' if args.random_shape else ''}-{'bf16' if dtype == 'bfloat16' else 'f32'}"
    d = work / name
    shard = None
    if args.shard:
        total = sum(p.numel() for p in model.state_dict().values()) * (2 if dtype == "bfloat16" else 4)
        shard = max(1, total // 3)  # -> about 3-4 shards
    mf.save_checkpoint(model, d, dtype, shard)
    label = f"{arch} seed={seed} {dtype}{' sharded' if shard else ''} [{describe_cfg(model.config)}]"
    return d, label, prompt_len, None, None


def check_one(args, arch: str, seed: int, work: Path) -> bool:
    d, label, prompt_len, fixed_prompt, stored = prepare(args, arch, seed, work)
    ref = mf.compute_reference(d, seed, prompt_len, prompt=fixed_prompt, min_distinct=1)
    prompt, greedy, ref_logits = ref["prompt_ids"], ref["output_ids"], ref["logits"]
    st = ref["stats"]
    notes = []
    if not ref["robust"]:
        notes.append(f"FRAGILE(min token margin {st['min_token_margin']:.2e}, router gap {st['min_router_gap']})")
    if stored is not None:
        if stored["output_ids"] != greedy:
            notes.append("WARNING: transformers no longer reproduces reference.json output_ids")
        lf = d / "reference_logits.npy"
        if lf.exists():
            dd, _ = compare_logits(np.load(lf), ref_logits)
            if dd > 1e-4:
                notes.append(f"WARNING: stored reference_logits differ from transformers by {dd:.2e}")
    if args.keep and not args.model:
        (d / "reference.json").write_text(json.dumps({
            "prompt_ids": prompt, "output_ids": greedy, "dtype": json.loads((d / "config.json").read_text())
            .get("dtype", "float32"), "transformers_version": mf.transformers.__version__,
            "torch_version": torch.__version__, "seed": seed, "description": label, "stats": st}, indent=2) + "\n")
        np.save(d / "reference_logits.npy", ref_logits)

    if args.numpy:
        npl = np_forward(d, prompt + greedy[: mf.NUM_NEW_TOKENS - 1])
        nd, where = compare_logits(npl, ref_logits)
        ok = nd <= args.atol
        print(f"{'PASS' if ok else 'FAIL'} numpy-vs-transformers {label} prompt_len={len(prompt)} "
              f"max|dlogit|={nd:.2e} {where} {' '.join(notes)}", flush=True)
        if not ok or (args.no_binary and getattr(args, "quiet_ref", False)):
            return ok

    if args.no_binary:
        print(f"REF  {label}")
        print(f"     dir {d}")
        print(f"     prompt_ids {prompt}")
        print(f"     output_ids {greedy}")
        print(f"     logits {list(ref_logits.shape)} std {st['logits_std']:.3f}; min token margin "
              f"{st['min_token_margin']:.3g}; min router gap {st['min_router_gap']}; "
              f"distinct experts/moe layer {st['distinct_experts_per_moe_layer']}"
              + (f"; clip fraction {st['clip_qkv_fraction_clipped']:.3f}" if "clip_qkv_fraction_clipped" in st
                 else "") + (f"; {' '.join(notes)}" if notes else ""))
        print(f"     would run: {args.binary} generate --model {d} --prompt-ids {','.join(map(str, prompt))} "
              f"--max-tokens 16 --ignore-eos --json --logits-out OUT.npy", flush=True)
        return True

    fails = []
    try:
        r1 = run_binary(args.binary, d, prompt, mf.NUM_NEW_TOKENS, work / "run1_logits.npy", args.extra_arg,
                        args.timeout)
        out_ids = [int(t) for t in r1.get("output_ids", [])]
        n_same = 0
        for a, b in zip(out_ids, greedy):
            if a != b:
                break
            n_same += 1
        if out_ids != greedy:
            fails.append(f"tokens: first {n_same}/16 equal; engine {out_ids} vs transformers {greedy}")
        if "prompt_ids" in r1 and [int(t) for t in r1["prompt_ids"]] != prompt:
            fails.append(f"engine echoed prompt_ids {r1['prompt_ids']} != {prompt}")
        d1, w1 = compare_logits(r1["_logits"], ref_logits[: len(prompt)])
        if not d1 <= args.atol:
            fails.append(f"prompt logits max|diff| {d1:.3e} {w1}")

        seq = prompt + greedy[: mf.NUM_NEW_TOKENS - 1]
        r2 = run_binary(args.binary, d, seq, 1, work / "run2_logits.npy", args.extra_arg, args.timeout)
        d2, w2 = compare_logits(r2["_logits"], ref_logits)
        if not d2 <= args.atol:
            fails.append(f"teacher-forced logits max|diff| {d2:.3e} {w2}")
        if [int(t) for t in r2.get("output_ids", [])][:1] != greedy[15:16]:
            fails.append(f"teacher-forced next token {r2.get('output_ids')} != {greedy[15:16]}")
    except BinaryError as e:
        print(f"FAIL {label}: engine error: {e}", flush=True)
        return False
    if fails:
        print(f"FAIL {label} prompt_len={len(prompt)} :: " + " | ".join(fails) + (f" {' '.join(notes)}" if notes
                                                                                 else ""), flush=True)
        if args.verbose:
            print(f"     dir {d}\n     run1: {r1['_cmd']}\n     run2: {r2['_cmd']}")
        return False
    print(f"PASS {label} prompt_len={len(prompt)} tokens 16/16 max|dlogit| prompt={d1:.2e} "
          f"teacher-forced={d2:.2e}" + (f" {' '.join(notes)}" if notes else ""), flush=True)
    return True


def self_test(args) -> int:
    """numpy re-implementation vs transformers: all stored fixtures + random shapes of every family."""
    ok = True
    fx = mf.DEFAULT_OUT
    for d in sorted(p for p in fx.iterdir() if (p / "reference.json").exists()) if fx.exists() else []:
        ref = json.loads((d / "reference.json").read_text())
        want = np.load(d / "reference_logits.npy")
        got = np_forward(d, ref["prompt_ids"] + ref["output_ids"][:15])
        diff, where = compare_logits(got, want)
        tok = [int(np.argmax(got[len(ref["prompt_ids"]) - 1 + i])) for i in range(16)] == ref["output_ids"]
        good = diff <= args.atol and tok
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} numpy-vs-fixture {d.name}: max|dlogit|={diff:.2e} {where} "
              f"greedy tokens {'equal' if tok else 'DIFFER'}", flush=True)
    args.numpy, args.no_binary, args.model, args.quiet_ref = True, True, None, True
    with tempfile.TemporaryDirectory(prefix="moemesh-selftest-") as tmp:
        for i in range(args.count):
            arch = ARCH_NAMES[i % len(ARCH_NAMES)]
            for rs in (False, True):
                if not rs and i >= len(ARCH_NAMES):
                    continue
                args.random_shape = rs
                w = Path(tmp) / f"{i}-{int(rs)}"
                w.mkdir()
                ok &= check_one(args, arch, args.seed + i, w)
                shutil.rmtree(w)
    print("self-test", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=ARCH_NAMES + ["any"], help="family; 'any' picks one per seed")
    ap.add_argument("--model", help="existing checkpoint dir instead of building one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=1, help="sweep seeds seed .. seed+count-1")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "random"], default="float32",
                    help="storage dtype of the built checkpoint (reference always computes in float32)")
    ap.add_argument("--shard", action="store_true", help="save sharded (index.json + ~3-4 shards)")
    ap.add_argument("--random-shape", action="store_true", help="random sizes/options derived from the seed")
    ap.add_argument("--binary", default=str(mf.REPO_ROOT / "build" / "bin" / "moemesh"))
    ap.add_argument("--extra-arg", action="append", default=[],
                    help="extra argument passed to the binary (repeatable), e.g. --extra-arg=--device=cpu")
    ap.add_argument("--keep", help="keep checkpoints (+ reference.json / reference_logits.npy) under this dir")
    ap.add_argument("--no-binary", action="store_true", help="only build and print the reference")
    ap.add_argument("--numpy", action="store_true",
                    help="also check the numpy re-implementation (np_forward) against transformers")
    ap.add_argument("--self-test", action="store_true",
                    help="numpy re-implementation vs stored fixtures and random shapes (no binary)")
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per binary call")
    ap.add_argument("--threads", type=int, default=4, help="torch CPU threads")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))

    if args.self_test:
        return self_test(args)
    if not args.model and not args.arch:
        ap.error("give --arch or --model")
    if not args.no_binary and not Path(args.binary).exists() and shutil.which(args.binary) is None:
        print(f"binary not found: {args.binary} (build it, pass --binary, or use --no-binary)", file=sys.stderr)
        return 2

    keep_root = Path(args.keep) if args.keep else None
    if keep_root:
        keep_root.mkdir(parents=True, exist_ok=True)
    n_fail = 0
    seeds = [args.seed] if args.model else list(range(args.seed, args.seed + args.count))
    for seed in seeds:
        arch = args.arch
        if arch == "any":
            arch = ARCH_NAMES[seed % len(ARCH_NAMES)]
        if keep_root:
            work = keep_root
            ok = check_one(args, arch, seed, work)
        else:
            with tempfile.TemporaryDirectory(prefix="moemesh-parity-") as tmp:
                ok = check_one(args, arch, seed, Path(tmp))
        n_fail += 0 if ok else 1
    if len(seeds) > 1:
        print(f"{len(seeds) - n_fail}/{len(seeds)} passed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
