"""A pure numpy re-implementation of every supported architecture's forward pass (the
specification the C++ engine has to meet), used by tools/parity.py --self-test to check itself
against transformers and by its reports. Float64 by default.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

DEEPSEEK = ("deepseek_v2", "deepseek_v3")


def load_safetensors_dir(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) checkpoint as float32 numpy arrays."""
    from safetensors.torch import load_file

    idx = model_dir / "model.safetensors.index.json"
    if idx.exists():
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fn in files:
        for k, v in load_file(str(model_dir / fn)).items():
            out[k] = v.float().numpy()
    return out


def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softmax(x):
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def np_forward(model_dir: Path, ids: list[int], dtype=np.float64) -> np.ndarray:
    """Logits [len(ids), vocab] computed from config.json + safetensors only (no transformers)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    W = {k: v.astype(dtype) for k, v in load_safetensors_dir(model_dir).items()}
    arch = cfg["model_type"]
    if arch in DEEPSEEK:
        return np_deepseek_forward(cfg, W, ids, dtype)
    if arch == "glm4_moe":
        return np_glm4_moe_forward(cfg, W, ids, dtype)
    if arch == "dbrx":
        return np_dbrx_forward(cfg, W, ids, dtype)
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    if arch == "olmoe":
        hd = H // nh  # OlmoeConfig has no head_dim
    eps = cfg["rms_norm_eps"]
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    assert rp.get("rope_type", "default") == "default", rp
    n_exp = cfg.get("num_local_experts") or cfg.get("num_experts")
    top_k = cfg["num_experts_per_tok"]
    norm_topk = True if arch == "mixtral" else bool(cfg.get("norm_topk_prob", False))
    clip = cfg.get("clip_qkv") if arch == "olmoe" else None
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step", 1) or 1
    T = len(ids)

    # RoPE tables, computed like transformers: float32 inv_freq, float32 angles
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(
        np.float32)
    ang = np.arange(T, dtype=np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([ang, ang], axis=-1)
    cos, sin = np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)  # [T, hd]

    def rope(x):  # x [heads, T, hd]; rotate_half on the two halves
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + np.concatenate([-x2, x1], axis=-1) * sin

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        if name + ".bias" in W:
            y = y + W[name + ".bias"]
        return y

    def mlp(x, prefix, g="gate_proj", u="up_proj", d="down_proj"):
        return lin(_silu(lin(x, f"{prefix}.{g}")) * lin(x, f"{prefix}.{u}"), f"{prefix}.{d}")

    h = W["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}"
        x = _rms(h, W[f"{p}.input_layernorm.weight"], eps)
        q, k, v = lin(x, f"{p}.self_attn.q_proj"), lin(x, f"{p}.self_attn.k_proj"), lin(x, f"{p}.self_attn.v_proj")
        if arch == "olmoe":  # RMSNorm over the whole projection, then clip, then RoPE
            q = _rms(q, W[f"{p}.self_attn.q_norm.weight"], eps)
            k = _rms(k, W[f"{p}.self_attn.k_norm.weight"], eps)
            if clip is not None:
                q, k, v = (np.clip(t, -clip, clip) for t in (q, k, v))
        q = q.reshape(T, nh, hd).transpose(1, 0, 2)
        k = k.reshape(T, nkv, hd).transpose(1, 0, 2)
        v = v.reshape(T, nkv, hd).transpose(1, 0, 2)
        if arch == "qwen3_moe":  # RMSNorm per head over head_dim, before RoPE
            q = _rms(q, W[f"{p}.self_attn.q_norm.weight"], eps)
            k = _rms(k, W[f"{p}.self_attn.k_norm.weight"], eps)
        q, k = rope(q), rope(k)
        rep = nh // nkv
        k = np.repeat(k, rep, axis=0)  # q head j uses kv head j // rep
        v = np.repeat(v, rep, axis=0)
        s = q @ k.transpose(0, 2, 1) * (hd ** -0.5) + mask
        a = _softmax(s) @ v  # [nh, T, hd]
        a = a.transpose(1, 0, 2).reshape(T, nh * hd)
        h = h + lin(a, f"{p}.self_attn.o_proj")

        x = _rms(h, W[f"{p}.post_attention_layernorm.weight"], eps)
        if arch == "mixtral":
            is_moe, mp, gname, (g, u, d) = True, f"{p}.block_sparse_moe", "gate", ("w1", "w3", "w2")
        else:
            is_moe = arch == "olmoe" or (li not in mlp_only and n_exp > 0 and (li + 1) % step == 0)
            mp, gname, (g, u, d) = f"{p}.mlp", "gate", ("gate_proj", "up_proj", "down_proj")
        if not is_moe:
            h = h + mlp(x, mp)
            continue
        logits = x @ W[f"{mp}.{gname}.weight"].T  # [T, E]
        probs = _softmax(logits)
        out = np.zeros_like(x)
        for t in range(T):
            sel = np.argsort(-probs[t], kind="stable")[:top_k]
            w = probs[t, sel]
            if norm_topk:
                w = w / w.sum()
            for e, we in zip(sel, w):
                out[t] += we * mlp(x[t:t + 1], f"{mp}.experts.{e}", g, u, d)[0]
        if arch == "qwen2_moe":
            sg = 1.0 / (1.0 + np.exp(-(x @ W[f"{mp}.shared_expert_gate.weight"].T)))  # [T, 1]
            out = out + sg * mlp(x, f"{mp}.shared_expert")
        h = h + out
    h = _rms(h, W["model.norm.weight"], eps)
    lm = W.get("lm_head.weight", W["model.embed_tokens.weight"])  # tied -> embed_tokens
    return (h @ lm.T).astype(np.float32)


def _yarn(rp: dict, dim: int, max_pos: int) -> tuple[np.ndarray, float, float]:
    """transformers' YaRN: (float32 inv_freq, cos/sin attention factor, MLA softmax mscale^2)."""
    base = rp["rope_theta"]
    orig = rp.get("original_max_position_embeddings", max_pos)
    factor = rp.get("factor") or max_pos / orig
    ms, ms_all = rp.get("mscale"), rp.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = rp.get("attention_factor")
    if att is None:
        att = get_mscale(factor, ms) / get_mscale(factor, ms_all) if ms and ms_all else get_mscale(factor)

    def corr(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr(rp.get("beta_fast") or 32), corr(rp.get("beta_slow") or 1)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos = (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    extra, inter = (1.0 / pos).astype(np.float32), (1.0 / (np.float32(factor) * pos)).astype(np.float32)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    ef = 1 - ramp
    inv = (inter * (1 - ef) + extra * ef).astype(np.float32)
    mscale2 = get_mscale(factor, ms_all) ** 2 if ms_all else 1.0
    return inv, float(att), mscale2


def np_deepseek_forward(cfg: dict, W: dict, ids: list[int], dtype) -> np.ndarray:
    """DeepSeek-V2 / V3 (multi-head latent attention, shared + grouped routed experts), written
    directly from transformers' modeling_deepseek_v2.py / modeling_deepseek_v3.py: keys and values
    expanded per head, no absorption."""
    v3 = cfg["model_type"] == "deepseek_v3"
    nh, eps = cfg["num_attention_heads"], cfg["rms_norm_eps"]
    nope, rd, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    rank, qk = cfg["kv_lora_rank"], cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    T = len(ids)
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rtype = rp.get("rope_type", rp.get("type", "default"))
    scale = qk ** -0.5
    if rtype == "yarn":
        inv_freq, att, mscale2 = _yarn(rp, rd, cfg["max_position_embeddings"])
        scale *= mscale2
    else:
        assert rtype == "default", rp
        inv_freq = (1.0 / (np.float32(rp["rope_theta"]) ** (np.arange(0, rd, 2, dtype=np.float32) / np.float32(rd))
                           )).astype(np.float32)
        att = 1.0
    ang = np.arange(T, dtype=np.float32)[:, None] * inv_freq[None, :]  # [T, rd/2]
    cos, sin = (np.cos(ang) * att).astype(dtype), (np.sin(ang) * att).astype(dtype)
    interleave = cfg.get("rope_interleave", True) if v3 else True

    def rope(x):  # x [heads, T, rd]
        if not v3:  # complex multiplication of the pairs (2i, 2i+1); the pairs stay in place
            a, b = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
            return out
        if interleave:  # pairs in, halves out (apply_rotary_pos_emb_interleave)
            a, b = x[..., 0::2], x[..., 1::2]
            return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
        c2, s2 = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
        x1, x2 = x[..., : rd // 2], x[..., rd // 2:]
        return x * c2 + np.concatenate([-x2, x1], axis=-1) * s2

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    def mlp(x, prefix):
        return lin(_silu(lin(x, f"{prefix}.gate_proj")) * lin(x, f"{prefix}.up_proj"), f"{prefix}.down_proj")

    E = cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts")
    top_k = cfg["num_experts_per_tok"]
    scaling = cfg.get("routed_scaling_factor", 2.5 if v3 else 1.0)
    method = "noaux_tc" if v3 else cfg.get("topk_method", "greedy")
    n_group = cfg.get("n_group") or 1
    topk_group = cfg.get("topk_group") or n_group
    first_dense = cfg.get("first_k_dense_replace", 3 if v3 else 0)

    h = W["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}"
        a_ = f"{p}.self_attn"
        x = _rms(h, W[f"{p}.input_layernorm.weight"], eps)
        if f"{a_}.q_proj.weight" in W:
            q = lin(x, f"{a_}.q_proj")
        else:
            q = lin(_rms(lin(x, f"{a_}.q_a_proj"), W[f"{a_}.q_a_layernorm.weight"], 1e-6), f"{a_}.q_b_proj")
        q = q.reshape(T, nh, qk).transpose(1, 0, 2)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        ckv = lin(x, f"{a_}.kv_a_proj_with_mqa")
        c, k_pe = _rms(ckv[:, :rank], W[f"{a_}.kv_a_layernorm.weight"], 1e-6), ckv[:, rank:]
        q_pe, k_pe = rope(q_pe), rope(k_pe[None])  # k_pe [1, T, rd], shared by the heads
        kv = (c @ W[f"{a_}.kv_b_proj.weight"].T).reshape(T, nh, nope + vd).transpose(1, 0, 2)
        k = np.concatenate([kv[..., :nope], np.repeat(k_pe, nh, axis=0)], axis=-1)
        v = kv[..., nope:]
        qs = np.concatenate([q_nope, q_pe], axis=-1)
        s_ = qs @ k.transpose(0, 2, 1) * scale + mask
        o = (_softmax(s_) @ v).transpose(1, 0, 2).reshape(T, nh * vd)
        h = h + lin(o, f"{a_}.o_proj")

        x = _rms(h, W[f"{p}.post_attention_layernorm.weight"], eps)
        mp = f"{p}.mlp"
        if li < first_dense:
            h = h + mlp(x, mp)
            continue
        logits = x @ W[f"{mp}.gate.weight"].T
        scores = 1.0 / (1.0 + np.exp(-logits)) if v3 else _softmax(logits)
        choice = scores + W[f"{mp}.gate.e_score_correction_bias"] if v3 else scores.copy()
        out = np.zeros_like(x)
        for t in range(T):
            ch = choice[t].copy()
            if method in ("noaux_tc", "group_limited_greedy") and n_group > 1:
                g = ch.reshape(n_group, E // n_group)
                gs = np.sort(g, axis=-1)[:, -2:].sum(-1) if v3 else g.max(-1)
                keep = np.argsort(-gs, kind="stable")[:topk_group]
                allowed = np.zeros(n_group, bool)
                allowed[keep] = True
                ch = np.where(np.repeat(allowed, E // n_group), ch, -np.inf if v3 else 0.0)
            sel = np.argsort(-ch, kind="stable")[:top_k]
            w = scores[t, sel]
            if v3 and cfg.get("norm_topk_prob", True):
                w = w / (w.sum() + 1e-20)
            w = w * scaling
            for e, we in zip(sel, w):
                if f"{mp}.experts.gate_up_proj" in W:
                    gu = x[t] @ W[f"{mp}.experts.gate_up_proj"][e].T
                    gg, uu = gu[: gu.shape[0] // 2], gu[gu.shape[0] // 2:]
                    out[t] += we * ((_silu(gg) * uu) @ W[f"{mp}.experts.down_proj"][e].T)
                else:
                    out[t] += we * mlp(x[t:t + 1], f"{mp}.experts.{e}")[0]
        h = h + out + mlp(x, f"{mp}.shared_experts")
    h = _rms(h, W["model.norm.weight"], eps)
    lm = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return (h @ lm.T).astype(np.float32)


def _gqa(q, k, v, nh, nkv, hd, mask):
    """q [nh, T, hd], k / v [nkv, T, hd] -> [T, nh * hd]; query head j reads kv head j // (nh / nkv)."""
    rep = nh // nkv
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
    a = _softmax(q @ k.transpose(0, 2, 1) * (hd ** -0.5) + mask) @ v
    return a.transpose(1, 0, 2).reshape(q.shape[1], nh * hd)


def _rope_tables(theta: float, rd: int, T: int, dtype):
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, rd, 2, dtype=np.float32) / np.float32(rd)))).astype(np.float32)
    ang = np.arange(T, dtype=np.float32)[:, None] * inv[None, :]
    emb = np.concatenate([ang, ang], axis=-1)
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


def np_glm4_moe_forward(cfg: dict, W: dict, ids: list[int], dtype) -> np.ndarray:
    """GLM-4.5 MoE, from transformers' modeling_glm4_moe.py: GQA with q/k/v biases, optional per-head
    q/k RMSNorm, RoPE (rotate_half) on the first int(head_dim * partial_rotary_factor) features,
    dense first layers, sigmoid router with e_score_correction_bias and grouped top-k, shared experts."""
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    eps = cfg.get("rms_norm_eps", 1e-5)
    rp = dict(cfg.get("rope_parameters") or {})
    assert rp.get("rope_type", "default") == "default", rp
    rd = int(hd * rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5)))
    T = len(ids)
    cos, sin = _rope_tables(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)), rd, T, dtype)

    def rope(x):  # x [heads, T, hd]: rotate the first rd features, pass the rest
        r_, p_ = x[..., :rd], x[..., rd:]
        x1, x2 = r_[..., : rd // 2], r_[..., rd // 2:]
        return np.concatenate([r_ * cos + np.concatenate([-x2, x1], axis=-1) * sin, p_], axis=-1)

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    def mlp(x, prefix):
        return lin(_silu(lin(x, f"{prefix}.gate_proj")) * lin(x, f"{prefix}.up_proj"), f"{prefix}.down_proj")

    E = cfg.get("n_routed_experts", 128)
    top_k = cfg.get("num_experts_per_tok", 8)
    n_group, topk_group = cfg.get("n_group", 1), cfg.get("topk_group", 1)
    scaling = cfg.get("routed_scaling_factor", 1.0)
    first_dense = cfg.get("first_k_dense_replace", 1)
    h = W["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}"
        x = _rms(h, W[f"{p}.input_layernorm.weight"], eps)
        q = lin(x, f"{p}.self_attn.q_proj").reshape(T, nh, hd)
        k = lin(x, f"{p}.self_attn.k_proj").reshape(T, nkv, hd)
        v = lin(x, f"{p}.self_attn.v_proj").reshape(T, nkv, hd).transpose(1, 0, 2)
        if cfg.get("use_qk_norm", False):
            q = _rms(q, W[f"{p}.self_attn.q_norm.weight"], eps)
            k = _rms(k, W[f"{p}.self_attn.k_norm.weight"], eps)
        q, k = rope(q.transpose(1, 0, 2)), rope(k.transpose(1, 0, 2))
        h = h + _gqa(q, k, v, nh, nkv, hd, mask) @ W[f"{p}.self_attn.o_proj.weight"].T
        x = _rms(h, W[f"{p}.post_attention_layernorm.weight"], eps)
        mp = f"{p}.mlp"
        if li < first_dense:
            h = h + mlp(x, mp)
            continue
        scores = 1.0 / (1.0 + np.exp(-(x @ W[f"{mp}.gate.weight"].T)))
        choice = scores + W[f"{mp}.gate.e_score_correction_bias"]
        out = np.zeros_like(x)
        for t in range(T):
            g = choice[t].reshape(n_group, E // n_group)
            keep = np.argsort(-np.sort(g, axis=-1)[:, -2:].sum(-1), kind="stable")[:topk_group]
            allowed = np.zeros(n_group, bool)
            allowed[keep] = True
            ch = np.where(np.repeat(allowed, E // n_group), choice[t], -np.inf)
            sel = np.argsort(-ch, kind="stable")[:top_k]
            w = scores[t, sel]
            if cfg.get("norm_topk_prob", True):
                w = w / (w.sum() + 1e-20)
            for e, we in zip(sel, w * scaling):
                if f"{mp}.experts.gate_up_proj" in W:
                    gu = x[t] @ W[f"{mp}.experts.gate_up_proj"][e].T
                    gg, uu = gu[: gu.shape[0] // 2], gu[gu.shape[0] // 2:]
                    out[t] += we * ((_silu(gg) * uu) @ W[f"{mp}.experts.down_proj"][e].T)
                else:
                    out[t] += we * mlp(x[t:t + 1], f"{mp}.experts.{e}")[0]
        h = h + out + mlp(x, f"{mp}.shared_experts")
    h = _rms(h, W["model.norm.weight"], eps)
    lm = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return (h @ lm.T).astype(np.float32)


def np_dbrx_forward(cfg: dict, W: dict, ids: list[int], dtype) -> np.ndarray:
    """DBRX, from transformers' modeling_dbrx.py: LayerNorm without bias (eps 1e-5), fused Wqkv
    clamped to clip_qkv, GQA with RoPE (rotate_half, the top-level rope_theta as transformers 5
    reads it), softmax top-k router with weights divided by their p-norm, fused experts
    (w1 gate, v1 up, w2 down used as x @ w2)."""
    H, nh = cfg["d_model"], cfg["n_heads"]
    ac, fc = cfg.get("attn_config") or {}, cfg.get("ffn_config") or {}
    nkv = ac.get("kv_n_heads", 1)
    hd = H // nh
    clip = ac.get("clip_qkv")
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", ac.get("rope_theta", 10000.0)))
    I, E, top_k = fc.get("ffn_hidden_size", 3584), fc.get("moe_num_experts", 4), fc.get("moe_top_k", 1)
    pnorm = fc.get("moe_normalize_expert_weights", 1.0)
    T = len(ids)
    cos, sin = _rope_tables(theta, hd, T, dtype)

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + np.concatenate([-x2, x1], axis=-1) * sin

    def ln(x, w):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w

    h = W["transformer.wte.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    for li in range(cfg["n_layers"]):
        p = f"transformer.blocks.{li}"
        a = f"{p}.norm_attn_norm"
        x = ln(h, W[f"{a}.norm_1.weight"])
        qkv = x @ W[f"{a}.attn.Wqkv.weight"].T
        if clip is not None:
            qkv = np.clip(qkv, -clip, clip)
        q = qkv[:, :H].reshape(T, nh, hd).transpose(1, 0, 2)
        k = qkv[:, H:H + nkv * hd].reshape(T, nkv, hd).transpose(1, 0, 2)
        v = qkv[:, H + nkv * hd:].reshape(T, nkv, hd).transpose(1, 0, 2)
        h = h + _gqa(rope(q), rope(k), v, nh, nkv, hd, mask) @ W[f"{a}.attn.out_proj.weight"].T
        x = ln(h, W[f"{a}.norm_2.weight"])
        probs = _softmax(x @ W[f"{p}.ffn.router.layer.weight"].T)
        m = f"{p}.ffn.experts.mlp"
        w1, v1, w2 = (W[f"{m}.{n}"].reshape(E, I, H) for n in ("w1", "v1", "w2"))
        out = np.zeros_like(x)
        for t in range(T):
            sel = np.argsort(-probs[t], kind="stable")[:top_k]
            w = probs[t, sel]
            if pnorm is not None:
                w = w / (np.sum(np.abs(w) ** pnorm) ** (1.0 / pnorm))
            for e, we in zip(sel, w):
                out[t] += we * ((_silu(x[t] @ w1[e].T) * (x[t] @ v1[e].T)) @ w2[e])
        h = h + out
    h = ln(h, W["transformer.norm_f.weight"])
    return (h @ W["lm_head.weight"].T).astype(np.float32)
