#!/usr/bin/env python3
"""Writes an FP8 block-quantized copy of a checkpoint in the layout of DeepSeek-V3 / Kimi K2 FP8
checkpoints, and optionally the same weights dequantized back to float32.

Each projection matrix (attention q/k/v/o, q_a/q_b/kv_a/kv_b, expert and dense MLP gate/up/down,
Mixtral's w1/w2/w3) becomes `X.weight` F8_E4M3 [out, in] plus `X.weight_scale_inv` F32
[ceil(out/128), ceil(in/128)], with w[i, j] = fp8(w)[i, j] * scale_inv[i // 128, j // 128]; every
other tensor (embeddings, norms, routers, LM head, biases) is copied as it is, and config.json gets
"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
"activation_scheme": "dynamic"}. Per 128x128 block: scale = max|finite value| / 448 in float32
(1 for an all-zero block), code = value / scale rounded to the nearest E4M3 value (ties to even),
saturating to +-448; NaN becomes 0. That is what `--quantization fp8` computes at load
(kernels::quantize_fp8_e4m3), so the two give the same codes and scales.

With --dequantized DIR, DIR gets the same checkpoint with each quantized matrix replaced by its
float32 dequantization (code * scale, rounded once to float32) and no quantization_config: the
unquantized reference the FP8 checkpoint must reproduce.

    .venv/bin/python tools/make_fp8_checkpoint.py SRC_DIR OUT_DIR [--dequantized DIR]

Needs only numpy. Reads a single model.safetensors or the shards of model.safetensors.index.json;
writes one model.safetensors. Files other than the weights and reference fixtures are copied.
"""
import argparse
import json
import pathlib
import re
import shutil
import struct
import sys

import numpy as np

BLOCK = 128
PROJECTIONS = re.compile(
    r"\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|gate_proj|"
    r"up_proj|down_proj|w1|w2|w3)\.weight$")
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}
NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}


def read_safetensors(path):
    """{name: (dtype string, shape, raw bytes)} in file order."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        out[name] = (e["dtype"], e["shape"], data[base + b:base + end])
    return out


def read_checkpoint(src):
    index = src / "model.safetensors.index.json"
    files = ([src / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
             if index.exists() else [src / "model.safetensors"])
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(f))
    return tensors


def write_safetensors(path, tensors):
    """tensors: {name: (dtype string, shape, raw bytes)}; each tensor's data 8-byte aligned."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        pad = (-offset) % 8
        blobs.append(b"\0" * pad)
        offset += pad
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def to_f32(dtype, shape, raw):
    if dtype == "BF16":
        u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        return u.view(np.float32).reshape(shape)
    if dtype in ("F32", "F16"):
        return np.frombuffer(raw, dtype=NUMPY_DTYPES[dtype]).astype(np.float32).reshape(shape)
    raise ValueError(f"cannot quantize dtype {dtype}")


def e4m3_table():
    """The float32 value of each of the 256 E4M3 codes (NaN for S.1111.111)."""
    t = np.zeros(256, dtype=np.float32)
    for c in range(256):
        e, m = (c >> 3) & 0xF, c & 7
        if e == 0xF and m == 7:
            v = np.nan
        elif e == 0:
            v = m * 2.0 ** -9
        else:
            v = (8 + m) * 2.0 ** (e - 10)
        t[c] = -v if c & 0x80 else v
    return t


def encode_e4m3(x):
    """float32 array -> E4M3 codes, round to nearest even, saturating to +-448, NaN -> 0."""
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x)
    code = np.zeros(x.shape, dtype=np.int32)
    sub = a < np.float32(2.0 ** -6)
    # Subnormal: steps of 2^-9 (8 steps are the smallest normal, code 0x08).
    code[sub] = np.rint(a[sub] * np.float32(512.0)).astype(np.int32)
    norm = ~sub & (a < np.float32(448.0))
    mant, exp = np.frexp(a[norm])  # a = mant * 2^exp, mant in [0.5, 1)
    e = exp.astype(np.int32) - 1
    q = np.rint((mant.astype(np.float32) * np.float32(2.0) - np.float32(1.0)) * np.float32(8.0))
    q = q.astype(np.int32)
    carry = q == 8
    e[carry] += 1
    q[carry] = 0
    code[norm] = np.minimum(((e + 7) << 3) | q, 0x7E)
    code[~sub & ~norm] = 0x7E  # 448 and above (infinities too)
    code |= np.where(np.signbit(x), 0x80, 0)
    code[np.isnan(x)] = 0
    return code.astype(np.uint8)


def quantize(w):
    """float32 [rows, cols] -> (codes uint8 [rows, cols], scale_inv float32 [rb, cb])."""
    rows, cols = w.shape
    rb, cb = -(-rows // BLOCK), -(-cols // BLOCK)
    codes = np.zeros((rows, cols), dtype=np.uint8)
    scale = np.ones((rb, cb), dtype=np.float32)
    for i in range(rb):
        for j in range(cb):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            a = np.abs(blk)
            a = a[np.isfinite(a)]
            amax = np.float32(a.max()) if a.size else np.float32(0.0)
            s = np.float32(amax / np.float32(448.0))
            if not s > 0:
                s = np.float32(1.0)
            scale[i, j] = s
            codes[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = encode_e4m3(
                (blk / s).astype(np.float32))
    return codes, scale


def dequantize(codes, scale):
    table = e4m3_table()
    s = np.repeat(np.repeat(scale, BLOCK, axis=0), BLOCK, axis=1)[:codes.shape[0], :codes.shape[1]]
    return (table[codes] * s).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=pathlib.Path)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--dequantized", type=pathlib.Path)
    a = ap.parse_args()

    tensors = read_checkpoint(a.src)
    fp8, deq = {}, {}
    n_quantized = 0
    for name, (dtype, shape, raw) in tensors.items():
        if PROJECTIONS.search(name) and len(shape) == 2 and dtype in ("F32", "F16", "BF16"):
            codes, scale = quantize(to_f32(dtype, shape, raw))
            fp8[name] = ("F8_E4M3", shape, codes.tobytes())
            fp8[name + "_scale_inv"] = ("F32", list(scale.shape), scale.tobytes())
            deq[name] = ("F32", shape, dequantize(codes, scale).tobytes())
            n_quantized += 1
        else:
            fp8[name] = deq[name] = (dtype, shape, raw)
    if n_quantized == 0:
        sys.exit(f"no projection matrices found in {a.src}")

    config = json.loads((a.src / "config.json").read_text())
    skip = {"model.safetensors", "model.safetensors.index.json", "config.json", "reference.json",
            "reference_logits.npy"}
    outputs = [(a.out, fp8, dict(config, quantization_config=QUANTIZATION_CONFIG))]
    if a.dequantized:
        outputs.append((a.dequantized, deq, {k: v for k, v in config.items()
                                             if k != "quantization_config"}))
    for out, ts, cfg in outputs:
        out.mkdir(parents=True, exist_ok=True)
        for f in a.src.iterdir():
            if f.is_file() and f.name not in skip and not f.name.endswith(".safetensors"):
                shutil.copy(f, out / f.name)
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        write_safetensors(out / "model.safetensors", ts)
        print(f"wrote {out} ({n_quantized} FP8 matrices)")


if __name__ == "__main__":
    main()
