#!/usr/bin/env python3
"""Writes a synthetic qwen3_moe (or deepseek_v2) checkpoint of a chosen shape (random BF16 weights).

The weights are random (seeded), so the text is gibberish; the shapes, tensor names and file
layout are those of a Hugging Face qwen3_moe checkpoint, and the demo model's tokenizer is copied
next to them (the vocabulary size follows it), so `moemesh serve --model DIR` runs it like any
other model. Needs only numpy (the project's .venv); with --generator torch the random numbers
come from PyTorch (on the GPU when there is one), which writes the 13.8 GB olmoe preset in seconds
where numpy takes minutes.

    .venv/bin/python tools/make_synthetic_model.py OUT_DIR
        [--preset olmoe|medium|small|deepseek-v2-lite]
        [--hidden N] [--layers N] [--experts N] [--top-k N] [--moe-intermediate N] [--heads N]
        [--kv-heads N] [--seed S] [--generator numpy|torch]

Presets: olmoe (OLMoE-1B-7B shapes: hidden 2048, 16 layers, 64 experts, top 8, expert width
1024 -- 6.9 B parameters, 13.8 GB), medium (hidden 1024, 8 layers, 32 experts, top 4, width 512 --
about 0.4 B parameters), small (hidden 512, 4 layers, 16 experts, top 2, width 512), and
deepseek-v2-lite (a deepseek_v2 checkpoint of DeepSeek-V2-Lite's shapes: hidden 2048, 27 layers of
which the first is dense, 16 heads of multi-head latent attention with a 512-wide latent and 64-wide
rotary key, no low-rank q, 64 experts of width 1408, top 6, 2 shared experts, YaRN rotary scaling;
15.3 B parameters with the demo vocabulary, 30.6 GB at 27 layers, 3.7 GB at 4, 1.17 GB per MoE
layer).
"""
import argparse
import json
import pathlib
import shutil
import struct
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"

PRESETS = {
    "olmoe": dict(hidden=2048, layers=16, experts=64, top_k=8, moe_intermediate=1024, heads=16,
                  kv_heads=16),
    "medium": dict(hidden=1024, layers=8, experts=32, top_k=4, moe_intermediate=512, heads=8,
                   kv_heads=4),
    "small": dict(hidden=512, layers=4, experts=16, top_k=2, moe_intermediate=512, heads=8,
                  kv_heads=4),
    "deepseek-v2-lite": dict(hidden=2048, layers=27, experts=64, top_k=6, moe_intermediate=1408,
                             heads=16, kv_heads=16, family="deepseek_v2", kv_lora=512, rope=64,
                             nope=128, v_head=128, shared=2, dense_intermediate=10944),
}


def deepseek_config(shape, vocab, demo):
    """config.json of a deepseek_v2 model of `shape` (DeepSeek-V2-Lite's settings otherwise)."""
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": vocab, "hidden_size": shape["hidden"], "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"], "num_key_value_heads": shape["heads"],
        "head_dim": shape["rope"], "q_lora_rank": None, "kv_lora_rank": shape["kv_lora"],
        "qk_nope_head_dim": shape["nope"], "qk_rope_head_dim": shape["rope"],
        "v_head_dim": shape["v_head"], "intermediate_size": shape["dense_intermediate"],
        "moe_intermediate_size": shape["moe_intermediate"], "n_routed_experts": shape["experts"],
        "num_experts_per_tok": shape["top_k"], "n_shared_experts": shape["shared"],
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1,
        "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "scoring_func": "softmax", "attention_bias": False, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 163840, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                         "mscale_all_dim": 0.707},
        "tie_word_embeddings": False, "bos_token_id": demo.get("bos_token_id"),
        "eos_token_id": demo.get("eos_token_id"),
    }


def bf16_bytes(a):
    """float32 array -> bfloat16 bytes (round to nearest even)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def add_deepseek_layers(shape, add):
    """The tensors of deepseek_v2's layers: latent attention, a dense first layer, then MoE."""
    H, heads = shape["hidden"], shape["heads"]
    lora, rope, nope, vd = shape["kv_lora"], shape["rope"], shape["nope"], shape["v_head"]
    E, I, S = shape["experts"], shape["moe_intermediate"], shape["shared"]

    def ffn(prefix, inter):
        add(prefix + "gate_proj.weight", [inter, H], H ** -0.5)
        add(prefix + "up_proj.weight", [inter, H], H ** -0.5)
        add(prefix + "down_proj.weight", [H, inter], inter ** -0.5)

    for l in range(shape["layers"]):
        p = f"model.layers.{l}."
        add(p + "input_layernorm.weight", [H], None)
        add(p + "post_attention_layernorm.weight", [H], None)
        add(p + "self_attn.q_proj.weight", [heads * (nope + rope), H], H ** -0.5)
        add(p + "self_attn.kv_a_proj_with_mqa.weight", [lora + rope, H], H ** -0.5)
        add(p + "self_attn.kv_a_layernorm.weight", [lora], None)
        add(p + "self_attn.kv_b_proj.weight", [heads * (nope + vd), lora], lora ** -0.5)
        add(p + "self_attn.o_proj.weight", [H, heads * vd], (heads * vd) ** -0.5)
        if l == 0:
            ffn(p + "mlp.", shape["dense_intermediate"])
            continue
        add(p + "mlp.gate.weight", [E, H], H ** -0.5)
        for e in range(E):
            ffn(f"{p}mlp.experts.{e}.", I)
        ffn(p + "mlp.shared_experts.", S * I)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    for k in ("hidden", "layers", "experts", "top_k", "moe_intermediate", "heads", "kv_heads"):
        ap.add_argument("--" + k.replace("_", "-"), type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generator", choices=["numpy", "torch"], default="numpy")
    a = ap.parse_args()
    shape = dict(PRESETS[a.preset])
    for k in shape:
        if getattr(a, k, None) is not None:
            shape[k] = getattr(a, k)
    H, L, E, I = shape["hidden"], shape["layers"], shape["experts"], shape["moe_intermediate"]
    heads, kv_heads = shape["heads"], shape["kv_heads"]
    head_dim = H // heads

    config = json.loads((DEMO / "config.json").read_text())
    vocab = config["vocab_size"]
    deepseek = shape.get("family") == "deepseek_v2"
    if deepseek:
        config = deepseek_config(shape, vocab, config)
    else:
      config.update({
        "hidden_size": H, "num_hidden_layers": L, "num_local_experts": E,
        "num_experts_per_tok": shape["top_k"], "moe_intermediate_size": I,
        "intermediate_size": 2 * I, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "max_position_embeddings": 4096,
      })

    rng = np.random.default_rng(a.seed)
    if a.generator == "torch":
        import torch
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        tgen = torch.Generator(device=dev).manual_seed(a.seed)

    def random_bf16(dims, scale):
        if a.generator == "torch":
            t = torch.randn(dims, generator=tgen, device=dev, dtype=torch.float32) * scale
            return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
        return bf16_bytes(rng.standard_normal(dims, dtype=np.float32) * scale)
    tensors = {}  # name -> (shape, scale)

    def add(name, dims, scale):
        tensors[name] = (dims, scale)

    add("model.embed_tokens.weight", [vocab, H], 0.02)
    add("model.norm.weight", [H], None)
    if deepseek:
        add_deepseek_layers(shape, add)
        add("lm_head.weight", [vocab, H], H ** -0.5)
    for l in range(0 if deepseek else L):
        p = f"model.layers.{l}."
        add(p + "input_layernorm.weight", [H], None)
        add(p + "post_attention_layernorm.weight", [H], None)
        add(p + "self_attn.q_proj.weight", [heads * head_dim, H], H ** -0.5)
        add(p + "self_attn.k_proj.weight", [kv_heads * head_dim, H], H ** -0.5)
        add(p + "self_attn.v_proj.weight", [kv_heads * head_dim, H], H ** -0.5)
        add(p + "self_attn.o_proj.weight", [H, heads * head_dim], H ** -0.5)
        add(p + "self_attn.q_norm.weight", [head_dim], None)
        add(p + "self_attn.k_norm.weight", [head_dim], None)
        add(p + "mlp.gate.weight", [E, H], H ** -0.5)
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            add(q + "gate_proj.weight", [I, H], H ** -0.5)
            add(q + "up_proj.weight", [I, H], H ** -0.5)
            add(q + "down_proj.weight", [H, I], I ** -0.5)

    header, offset = {}, 0
    for name, (dims, _) in tensors.items():
        n = int(np.prod(dims)) * 2
        header[name] = {"dtype": "BF16", "shape": dims, "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", "synthetic": "tools/make_synthetic_model.py"}
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)

    a.out.mkdir(parents=True, exist_ok=True)
    params = sum(int(np.prod(d)) for d, _ in tensors.values())
    print(f"{a.out}: {params / 1e9:.3f} B parameters, {offset / 1e9:.2f} GB", file=sys.stderr)
    with open(a.out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (name, (dims, scale)) in enumerate(tensors.items()):
            if scale is None:
                f.write(bf16_bytes(np.ones(dims, dtype=np.float32)))
            else:
                f.write(random_bf16(dims, scale))
            if i % 200 == 0:
                print(f"  {i}/{len(tensors)} tensors", file=sys.stderr)
    (a.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (DEMO / f).exists():
            shutil.copy(DEMO / f, a.out / f)


if __name__ == "__main__":
    main()
