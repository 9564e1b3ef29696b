#!/usr/bin/env python3
"""Writes the seed corpora of tests/fuzz/corpus/<target>/ from the fixtures and tests.

The corpora are stored in the repository; run this again only to regenerate the seeds it makes
(files named seed-*). Regression inputs (crash-*, regression-*) are kept as they are.
Needs protoc (Debian: protobuf-compiler) for the protobuf seeds.

    tests/fuzz/make_seeds.py
"""
import glob
import json
import os
import struct
import subprocess
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
CORPUS = os.path.join(ROOT, "tests", "fuzz", "corpus")


def out(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def clear(target):
    for p in glob.glob(os.path.join(CORPUS, target, "seed-*")):
        os.remove(p)


def protoc_encode(message, text):
    return subprocess.run(
        ["protoc", "-I", os.path.join(ROOT, "proto"), "--encode=moemesh.proto." + message,
         "engine.proto", "cluster.proto", "dataplane.proto"],
        input=text.encode(), capture_output=True, check=True).stdout


# --- safetensors_header: real headers of the fixtures, repacked with their small tensors -------
SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def safetensors(entries, metadata=None, pad_to=8):
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, blob in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % pad_to)
    return struct.pack("<Q", len(text)) + text + data


def small_tensors(path, budget=3000):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    picked, used = [], 0
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        if used + end - b > budget:
            continue
        picked.append((name, e["dtype"], e["shape"], body[b:end]))
        used += end - b
    return picked, header.get("__metadata__")


def safetensors_seeds():
    t = "safetensors_header"
    clear(t)
    for model in ["mixtral-tiny", "mixtral-fp8", "deepseek-v3-fp8", "dbrx-tiny", "glm4moe-bf16",
                  "qwen2moe-tiny", "olmoe-tiny", "deepseek-v2-tiny"]:
        files = sorted(glob.glob(os.path.join(FIX, "models", model, "*.safetensors")))
        if not files:
            continue
        entries, meta = small_tensors(files[0])
        out(t, model + ".safetensors", safetensors(entries, meta))
    f32 = struct.pack("<4f", 1.0, -2.0, 0.5, 3.0)
    out(t, "empty-header", safetensors([]))
    out(t, "metadata-only", safetensors([], {"format": "pt"}))
    out(t, "all-dtypes", safetensors([(d, d, [2], bytes(2 * s)) for d, s in SIZES.items()]))
    out(t, "scalar-and-zero", safetensors([("s", "F32", [], f32[:4]), ("z", "F32", [0, 4], b""),
                                           ("m", "BF16", [2, 2], f32[:8])]))
    out(t, "misaligned", safetensors([("a", "U8", [1], b"\1"), ("w", "F32", [2, 2], f32)], pad_to=1))
    good = safetensors([("w", "F32", [2, 2], f32)])
    out(t, "truncated-data", good[:-3])
    out(t, "truncated-header", good[:20])
    out(t, "header-too-long", struct.pack("<Q", 1 << 40) + good[8:])
    out(t, "not-an-object", struct.pack("<Q", 8) + b"[1,2,3] " + f32)
    out(t, "bad-offsets", struct.pack("<Q", 64) +
        b'{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[8,0]}}'.ljust(64) + f32)
    out(t, "negative-dim", struct.pack("<Q", 64) +
        b'{"w":{"dtype":"F32","shape":[-1,4],"data_offsets":[0,16]}}'.ljust(64) + f32)
    out(t, "huge-dims", struct.pack("<Q", 96) +
        b'{"w":{"dtype":"F64","shape":[1125899906842624,1125899906842624],"data_offsets":[0,16]}}'
        .ljust(96) + f32)


# --- model_config -------------------------------------------------------------------------------
def config_seeds():
    t = "model_config"
    clear(t)
    for p in sorted(glob.glob(os.path.join(FIX, "configs", "*", "config.json")) +
                    glob.glob(os.path.join(FIX, "models", "*", "config.json"))):
        name = os.path.basename(os.path.dirname(p))
        kind = "configs" if "/configs/" in p else "models"
        out(t, f"{kind}-{name}.json", open(p, "rb").read())
    out(t, "empty-object.json", "{}")
    out(t, "not-json.json", "{\"model_type\": ")


# --- tokenizer_json and tokenizer ---------------------------------------------------------------
TOKENIZERS = ["gpt2", "llama2", "llama3", "mistral", "qwen2", "deepseek_v3", "misc_affix",
              "misc_bert", "misc_meta", "misc_split"]  # the order of tokenizer_fuzz.cpp


def tokenizer_seeds():
    clear("tokenizer_json")
    clear("tokenizer")
    for i, name in enumerate(TOKENIZERS):
        d = os.path.join(FIX, "tokenizers", name)
        out("tokenizer_json", name + ".json", open(os.path.join(d, "tokenizer.json"), "rb").read())
        cases = json.load(open(os.path.join(d, "cases.json")))
        texts = [c["text"] for c in cases.get("cases", []) if c.get("text")]
        texts.sort(key=len)
        for j, text in enumerate(texts[:2] + texts[len(texts) // 2:len(texts) // 2 + 1] + texts[-1:]):
            out("tokenizer", f"{name}-{j}", bytes([i | 0x10]) + text.encode()[:512])
        ids = []
        for c in cases.get("decode_cases", [])[:1]:
            ids = c.get("ids", [])
        if ids:
            out("tokenizer", f"{name}-ids", bytes([i | 0x20]) +
                b"".join(struct.pack("<H", x & 0x7fff) for x in ids[:64]))
    out("tokenizer", "invalid-utf8", bytes([0]) + b"abc\xff\xfe\xc3")


# --- chat_template -------------------------------------------------------------------------------
def template_of(d):
    j = os.path.join(d, "chat_template.jinja")
    if os.path.exists(j):
        return open(j).read()
    cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
    t = cfg.get("chat_template")
    if isinstance(t, list):
        t = next(x["template"] for x in t if x["name"] == "default")
    return t


def chat_template_seeds():
    t = "chat_template"
    clear(t)
    dirs = sorted(glob.glob(os.path.join(FIX, "chat_templates", "*", "tokenizer_config.json")) +
                  glob.glob(os.path.join(FIX, "chat_templates", "_forms", "*", "tokenizer_config.json")))
    for cfg in dirs:
        d = os.path.dirname(cfg)
        name = os.path.relpath(d, os.path.join(FIX, "chat_templates")).replace("/", "-")
        tmpl = template_of(d)
        if not tmpl:
            continue
        cases = json.load(open(os.path.join(d, "cases.json"))).get("cases", [])
        for c in cases[:3]:
            v = {"messages": c["messages"], "add_generation_prompt": c.get("add_generation_prompt", False),
                 "extra": c.get("extra", {})}
            out(t, f"{name}-{c['name']}", tmpl.encode() + b"\0" + json.dumps(v).encode())
    small = [
        "{% for m in messages %}{{ m.role }}: {{ m.content | trim }}\n{% endfor %}",
        "{{ messages | tojson(indent=2) }}{% if add_generation_prompt %}>{% endif %}",
        "{% set ns = namespace(n=0) %}{% for i in range(3) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}",
        "{% macro f(a, b=2) %}{{ a * b }}{% endmacro %}{{ f(3) }}{{ '%d' % 5 }}{{ 'x'[::-1] }}",
        "{{ raise_exception('no') }}",
    ]
    for i, s in enumerate(small):
        out(t, f"small-{i}", s.encode() + b"\0" + b'{"messages": [{"role": "user", "content": " hi "}]}')


# --- openai_request ------------------------------------------------------------------------------
def http(method, path, body=None, headers=()):
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost:8000"] + list(headers)
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def openai_seeds():
    t = "openai_request"
    clear(t)
    name = "qwen2-fuzz"
    bodies = [
        ("/v1/completions", {"model": name, "prompt": "Hello", "max_tokens": 3}),
        ("/v1/completions", {"model": name, "prompt": [[1, 2, 3], "x"], "max_tokens": 2, "n": 2,
                             "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 1,
                             "stop": ["\n"], "logprobs": 2, "echo": True}),
        ("/v1/completions", {"model": name, "prompt": "x", "stream": True,
                             "stream_options": {"include_usage": True}, "logit_bias": {"5": -100},
                             "presence_penalty": 0.5, "frequency_penalty": 0.1,
                             "repetition_penalty": 1.1, "min_tokens": 1, "ignore_eos": True}),
        ("/v1/completions", {"model": name, "prompt": "x", "temperature": "hot"}),
        ("/v1/completions", {"model": name, "prompt": [10 ** 9]}),
        ("/v1/completions", {"model": name, "prompt": "x", "max_tokens": 10 ** 7}),
        ("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/chat/completions", {"model": name, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Tell me about the sea."}]}],
            "max_tokens": 4, "logprobs": True, "top_logprobs": 2, "stream": True,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "chat_template_kwargs": {"enable_thinking": False}}),
        ("/v1/chat/completions", {"model": name, "messages": [1, 2]}),
        ("/tokenize", {"model": name, "prompt": "Hello world"}),
        ("/tokenize", {"model": name, "messages": [{"role": "user", "content": "Hi"}]}),
        ("/detokenize", {"model": name, "tokens": [9707, 1879]}),
    ]
    for i, (path, body) in enumerate(bodies):
        out(t, f"{i:02d}{path.replace('/', '-')}", http("POST", path, body))
    out(t, "models", http("GET", "/v1/models", headers=["Authorization: Bearer k"]))
    out(t, "not-json", http("POST", "/v1/completions", b'{"prompt": '))
    out(t, "chunked", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n10\r\n{\"prompt\": \"ab\",\r\n10\r\n \"max_tokens\": 1}\r\n0\r\n\r\n")


# --- wire_header ---------------------------------------------------------------------------------
def wire_seeds():
    t = "wire_header"
    clear(t)

    def msg(flags, header, payload, seal=True):
        # The data plane seals every header with zlib's CRC-32 of its bytes (transport/detail/wire.h).
        if seal:
            header = header + struct.pack("<I", zlib.crc32(header))
        return bytes([flags]) + struct.pack("<H", len(header)) + header + payload

    d = protoc_encode("DispatchHeader", "version: 2 epoch: 3 step: 7 layer: 1 micro_batch: 0 "
                      "n_tokens: 2 slots: 2 step_tokens: 2 hidden: 4 dtype: WIRE_DTYPE_BF16 seq: 9")
    routing = struct.pack("<4i", 0, 3, 1, 2) + struct.pack("<4f", 0.6, 0.4, 0.5, 0.5)
    out(t, "dispatch-bf16", msg(2 * 7, d, routing + bytes(range(16))))
    d32 = protoc_encode("DispatchHeader", "version: 2 n_tokens: 1 slots: 1 hidden: 2 seq: 1")
    out(t, "dispatch-f32", msg(0, d32, struct.pack("<i3f", 1, 1.0, 0.5, -0.5)))
    out(t, "dispatch-bad-seal", msg(0, d32, struct.pack("<i3f", 1, 1.0, 0.5, -0.5), seal=False))
    out(t, "dispatch-wrong-version", msg(0, protoc_encode("DispatchHeader", "version: 1 hidden: 1"), b""))
    out(t, "dispatch-huge", msg(0, protoc_encode("DispatchHeader",
                                                 "version: 2 n_tokens: 4611686018427387904 slots: 2147483647 hidden: 9223372036854775807"), b""))
    r = protoc_encode("ReplyHeader", "version: 2 n_tokens: 2 slots: 2 hidden: 4 dtype: WIRE_DTYPE_BF16 seq: 9")
    out(t, "reply-bf16", msg(1 | 2 * 3, r, bytes(range(16)) + b"\0\1\0\0"))
    out(t, "reply-error", msg(1, protoc_encode("ReplyHeader", 'version: 2 error: "expert 3 is not held"'), b""))

    def address(raw, profile):
        # A framed data-plane address (transport/detail/ucx.h): magic, version 2, raw length,
        # FNV-1a of profile + raw, profile length, profile, raw.
        body = profile + raw
        h = 2166136261
        for b in body:
            h = ((h ^ b) * 16777619) & 0xFFFFFFFF
        return b"MMDP" + bytes([2]) + struct.pack("<II", len(raw), h) + bytes([len(profile)]) + body

    out(t, "address-sm-tcp", address(bytes(range(40)),
                                     b"host=0f3c posix=32832 sysv=32832 tcp_tx=64k tcp_rx=64k"))
    out(t, "address-small-rx", address(b"\x01\x02\x03", b"tcp_tx=8k tcp_rx=16k"))


# --- control_messages ----------------------------------------------------------------------------
def control_seeds():
    t = "control_messages"
    clear(t)
    gen = [
        'request_id: "r1" prompt_ids: [1, 5, 9] n: 1 sampling { temperature: 0 max_tokens: 4 logprobs: -1 top_p: 1 repetition_penalty: 1 }',
        'request_id: "r2" prompt_ids: [3, 4] n: 2 sampling { temperature: 0.8 top_p: 0.9 top_k: 5 min_p: 0.05 has_seed: true seed: 42 '
        'presence_penalty: 0.5 frequency_penalty: 0.2 repetition_penalty: 1.2 logit_bias { key: 7 value: 5 } max_tokens: 8 '
        'min_tokens: 2 stop_token_ids: [11] logprobs: 3 }',
        'request_id: "r3" prompt_ids: [63] n: 1 sampling { temperature: 1 top_p: 1 repetition_penalty: 1 ignore_eos: true max_tokens: 2 logprobs: 0 }',
    ]
    for i, g in enumerate(gen):
        out(t, f"generate-{i}", bytes([0 | (i << 3)]) + protoc_encode("GenerateRequest", g))
    placements = [
        "version: 3 workers { worker_id: 0 name: \"e0\" } workers { worker_id: 1 name: \"e1\" } "
        "layers { layer: 0 experts { workers: [0] } experts { workers: [1] } experts { workers: [0, 1] } experts { } } "
        "layers { layer: 1 experts { workers: [1] } experts { workers: [5] } }",
        "version: 1",
    ]
    for i, p in enumerate(placements):
        out(t, f"placement-{i}", bytes([1 | (i << 3), 2, 4, 1, 0x03 + i]) + protoc_encode("Placement", p))
    out(t, "assignment-0", bytes([2]) + protoc_encode("Assignment", "version: 2 experts { layer: [0, 0, 1] expert: [0, 3, 1] }"))
    out(t, "assignment-bad", bytes([2]) + protoc_encode("Assignment", "version: 2 experts { layer: [0, 9] expert: [-1, 99] }"))
    out(t, "release-0", bytes([2 | 8]) + protoc_encode("Assignment", "version: 3 experts { layer: [0] expert: [0] }"))
    deltas = [
        ['index: 0 tokens { id: 9707 logprob: -0.5 top { id: 9707 logprob: -0.5 } top { id: 1 logprob: -2 } } queue_seconds: 0.01',
         'index: 0 tokens { id: 1879 } tokens { id: 0 }',
         'index: 0 tokens { id: 13 } finish_reason: "stop"'],
        ['index: 0 tokens { id: 9707 }', 'index: 1 tokens { id: 198 } finish_reason: "length"',
         'index: 0 finish_reason: "error" error: "worker lost" unavailable: true'],
    ]
    for i, ds in enumerate(deltas):
        for which in range(4):
            blob = b""
            for d in ds:
                m = protoc_encode("SequenceDelta", d)
                blob += struct.pack("<H", len(m)) + m
            out(t, f"deltas-{i}-{which}", bytes([3 | (which << 3)]) + blob)


if __name__ == "__main__":
    safetensors_seeds()
    config_seeds()
    tokenizer_seeds()
    chat_template_seeds()
    openai_seeds()
    wire_seeds()
    control_seeds()
    for d in sorted(os.listdir(CORPUS)):
        files = os.listdir(os.path.join(CORPUS, d))
        print(f"{d}: {len(files)} files, {sum(os.path.getsize(os.path.join(CORPUS, d, f)) for f in files)} bytes")
