#!/usr/bin/env python3
"""Train moemesh's built-in demo model: a small qwen3_moe that writes English prose.

Everything comes from this machine and Debian's archive; nothing is fetched from a model or
data-set hub.

  corpus     Jane Austen's six novels (Project Gutenberg texts, public domain), as shipped in the
             Debian package r-cran-janeaustenr (1.0.0-1, MIT). The script reads the package's
             R lazy-load database (data/Rdata.rdb) with a small R-unserialiser written here, so R
             itself is not needed. It uses the installed package when present, else
             `apt-get download`s the .deb into the cache folder and unpacks it with dpkg-deb.
  tokenizer  byte-level BPE in the Qwen2 style (NFC, Qwen2 split regex + ByteLevel), trained with
             Hugging Face `tokenizers`, special tokens <|endoftext|>, <|im_start|>, <|im_end|>.
  model      transformers Qwen3MoeForCausalLM trained from scratch (next-token prediction,
             AdamW, warm-up + cosine) on prose windows plus ChatML dialogue samples built from the
             corpus (the user gives the start of a paragraph, the assistant continues it).
  output     OUT/config.json, model.safetensors (BF16), generation_config.json, tokenizer.json,
             tokenizer_config.json (ChatML chat_template), train_log.json.

Usage:
  /work/refenv/bin/python tools/train_demo_model.py --out models/demo             # ~40 min
  /work/refenv/bin/python tools/train_demo_model.py --out /tmp/smoke --minutes 2  # smoke run
  /work/refenv/bin/python tools/train_demo_model.py --out models/demo --samples-only

The run is deterministic given --seed and the number of optimiser steps. By default the step
count is derived from --minutes by timing the first steps (so it depends on the machine's speed);
pass --steps N (the log and train_log.json print N) to reproduce a run exactly.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CORPUS_PACKAGE = "r-cran-janeaustenr"
CORPUS_VERSION = "1.0.0-1"
R_DATA_SUBDIR = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
          "persuasion"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                     r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SAMPLE_PROMPTS = [
    "It was a fine morning in the country, and",
    "The young lady entered the room and",
    "My dear sister,",
    "He had never been so happy in his life, for",
]
CHAT_SAMPLE_PROMPTS = [
    "Mr. Darcy walked slowly towards the window.",
    "Tell me a story about a ball in the country.",
]


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Corpus: Debian's r-cran-janeaustenr, read without R
# --------------------------------------------------------------------------------------------

class _RUnserializer:
    """Enough of R's XDR serialisation format (versions 2 and 3) for data vectors and lists."""

    def __init__(self, data: bytes):
        self.b = data
        self.p = 0
        self.refs: list = []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def _bytes(self, n: int) -> bytes:
        v = self.b[self.p:self.p + n]
        self.p += n
        return v

    def read(self):
        if self._bytes(2) != b"X\n":
            raise ValueError("not an XDR R serialisation")
        version = self._int()
        self._int()
        self._int()
        if version == 3:
            self._bytes(self._int())  # native encoding name
        return self._item()

    def _item(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == 254:  # NILVALUE
            return None
        if t in (241, 242, 247, 251, 252, 253):  # base/empty/global envs, missing, unbound
            return ("special", t)
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self._int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            sym = ("sym", self._item())
            self.refs.append(sym)
            return sym
        if t in (2, 3, 5, 6, 17):  # pairlist-like
            attr = self._item() if has_attr else None
            tag = self._item() if has_tag else None
            car = self._item()
            cdr = self._item()
            return ("pair", tag, car, cdr, attr)
        if t == 4:  # ENVSXP
            self._int()
            env: list = ["env"]
            self.refs.append(env)
            env += [self._item() for _ in range(4)]
            return env
        if t == 9:  # CHARSXP
            n = self._int()
            return None if n == -1 else self._bytes(n).decode("utf-8", "replace")
        if t in (10, 13):
            n = self._int()
            value = list(struct.unpack(">%di" % n, self._bytes(4 * n)))
        elif t == 14:
            n = self._int()
            value = list(struct.unpack(">%dd" % n, self._bytes(8 * n)))
        elif t in (16, 19, 20):
            n = self._int()
            value = [self._item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R object type {t} at byte {self.p}")
        attr = self._item() if has_attr else None
        return ("vec", t, value, _pairlist_to_dict(attr))


def _pairlist_to_dict(x) -> dict:
    out = {}
    while x is not None and x[0] == "pair":
        out[x[1][1] if x[1] else None] = x[2]
        x = x[3]
    return out


def _find_corpus_dir(cache: Path) -> Path:
    system = Path("/") / R_DATA_SUBDIR
    if (system / "Rdata.rdb").exists():
        return system
    unpacked = cache / "janeaustenr" / R_DATA_SUBDIR
    if (unpacked / "Rdata.rdb").exists():
        return unpacked
    log(f"corpus: {CORPUS_PACKAGE} is not installed; fetching it with apt-get download")
    work = cache / "deb"
    work.mkdir(parents=True, exist_ok=True)
    for f in work.glob("*.deb"):
        f.unlink()
    cmd = ["apt-get", "download", f"{CORPUS_PACKAGE}={CORPUS_VERSION}"]
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if r.returncode != 0:
        cmd = ["apt-get", "download", CORPUS_PACKAGE]
        r = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    debs = sorted(work.glob("*.deb"))
    if r.returncode != 0 or not debs:
        sys.exit(f"error: `{' '.join(cmd)}` failed ({r.stderr.strip()}); run `apt-get update` "
                 f"or `apt-get install {CORPUS_PACKAGE}` and try again")
    target = cache / "janeaustenr"
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(target)], check=True)
    if not (unpacked / "Rdata.rdb").exists():
        sys.exit(f"error: {debs[0]} has no {R_DATA_SUBDIR}/Rdata.rdb")
    return unpacked


def load_novels(cache: Path) -> tuple[dict[str, list[str]], Path]:
    """Returns {novel: [line, ...]} exactly as the R package stores them."""
    d = _find_corpus_dir(cache)
    index = _RUnserializer(gzip.decompress((d / "Rdata.rdx").read_bytes())).read()
    fields = dict(zip(index[3]["names"][2], index[2]))
    variables = fields["variables"]
    names = variables[3]["names"][2]
    db = (d / "Rdata.rdb").read_bytes()
    novels = {}
    for name, entry in zip(names, variables[2]):
        off, length = entry[2]
        chunk = db[off:off + length]
        (n,) = struct.unpack(">i", chunk[:4])
        data = zlib.decompress(chunk[4:])
        if len(data) != n:
            raise ValueError(f"{d}/Rdata.rdb: bad chunk for {name}")
        obj = _RUnserializer(data).read()
        novels[name] = [line or "" for line in obj[2]]
    missing = [n for n in NOVELS if n not in novels]
    if missing:
        sys.exit(f"error: {d}/Rdata.rdb lacks {missing}")
    return novels, d


def paragraphs_of(lines: list[str]) -> list[str]:
    """Unwraps the Gutenberg line breaks into paragraphs and drops headings and title matter."""
    paras, cur = [], []
    for line in lines + [""]:
        line = line.strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    out = []
    for p in paras:
        p = p.replace("_", "")              # _italics_
        p = re.sub(r"\s+", " ", p).strip()
        if not re.search(r"[a-z]", p):       # CHAPTER IV, THE END, (1811)
            continue
        if re.match(r"(?i)^(chapter|volume)\b", p) and len(p) < 40:
            continue
        if re.match(r"(?i)^(by )?(miss )?jane austen", p) and len(p) < 40:
            continue
        if len(p.split()) <= 4 and not re.search(r"[.!?;:,\"')-]$", p):   # titles, "by", Finis
            continue
        out.append(p)
    return out


_SENTENCE_END = re.compile(r"[.!?][\"')]?\s+(?=[\"'(]?[A-Z])")


def make_chat_samples(paras: list[str], rng: np.random.Generator) -> list[str]:
    """ChatML dialogues: the user gives the start of a paragraph, the assistant continues it."""
    prefixes = ["", "", "", "", "", "", "Continue the story: ", "Please continue:\n",
                "Go on: ", "Continue this passage.\n\n"]
    samples = []
    for i, p in enumerate(paras):
        words = len(p.split())
        if words < 25 or words > 260:
            continue
        cuts = [m.end() for m in _SENTENCE_END.finditer(p)]
        cuts = [c for c in cuts if 5 <= len(p[:c].split()) <= 60 and len(p[c:].split()) >= 8]
        if cuts:
            cut = cuts[int(rng.integers(0, min(len(cuts), 2)))]
            user, answer = p[:cut].strip(), p[cut:].strip()
        else:  # one long sentence: cut after a comma or semicolon
            m = [x.end() for x in re.finditer(r"[,;] ", p) if 6 <= len(p[:x.end()].split()) <= 40]
            if not m:
                continue
            user, answer = p[:m[0]].strip(), p[m[0]:].strip()
        if len(answer.split()) < 60 and i + 1 < len(paras) and len(paras[i + 1].split()) < 200:
            answer = answer + "\n\n" + paras[i + 1]
        user = prefixes[int(rng.integers(0, len(prefixes)))] + user
        samples.append(f"<|im_start|>user\n{user}<|im_end|>\n"
                       f"<|im_start|>assistant\n{answer}<|im_end|>\n")
    return samples


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # The Python ByteLevel decoder constructor keeps its defaults; write Qwen2's fields.
    spec = json.loads(tok.to_str())
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                       "use_regex": False}
    return Tokenizer.from_str(json.dumps(spec))


def write_tokenizer_files(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {}
    for t in SPECIAL_TOKENS:
        added[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 1024,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Data streams
# --------------------------------------------------------------------------------------------

def encode_with_starts(tok, text: str, starts_chars: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `text` and the token indices at which the given character offsets begin."""
    enc = tok.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    tok_starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)
    idx = np.searchsorted(tok_starts, np.asarray(starts_chars, dtype=np.int64))
    idx = idx[idx < len(ids)]
    ok = tok_starts[idx] == np.asarray(starts_chars[:len(idx)], dtype=np.int64)
    return ids, np.unique(idx[ok])


def build_stream(tok, docs: list[list[str]], sep: str) -> tuple[np.ndarray, np.ndarray]:
    """Joins docs (each a list of units joined by sep) with <|endoftext|>; returns ids, unit starts."""
    eot = tok.token_to_id("<|endoftext|>")
    all_ids, all_starts, base = [], [], 0
    for units in docs:
        text, starts, pos = "", [], 0
        for k, u in enumerate(units):
            if k:
                text += sep
                pos += len(sep)
            starts.append(pos)
            text += u
            pos += len(u)
        ids, st = encode_with_starts(tok, text, starts)
        all_ids.append(ids)
        all_ids.append(np.asarray([eot], dtype=np.int64))
        all_starts.append(st + base)
        base += len(ids) + 1
    return np.concatenate(all_ids), np.concatenate(all_starts)


class WindowSampler:
    """Deterministic windows of seq_len + 1 tokens that start at unit (paragraph/sample) starts."""

    def __init__(self, ids: np.ndarray, starts: np.ndarray, seq_len: int, seed: int):
        self.ids = ids
        self.starts = starts[starts + seq_len + 1 <= len(ids)]
        self.seq_len = seq_len
        self.rng = np.random.default_rng(seed)
        self.order = np.empty(0, dtype=np.int64)
        self.pos = 0
        self.passes = 0

    def next(self) -> np.ndarray:
        if self.pos >= len(self.order):
            self.order = self.rng.permutation(self.starts)
            self.pos = 0
            self.passes += 1
        s = int(self.order[self.pos])
        self.pos += 1
        return self.ids[s:s + self.seq_len + 1]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def make_config(args, vocab_size: int, ids: dict):
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,          # unused: every layer is sparse
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        hidden_act="silu",
        max_position_embeddings=args.max_positions,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        sliding_window=None,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=False,
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=None,   # a padding_idx would freeze <|endoftext|>'s (tied) embedding
        use_cache=True,
    )


def load_balancing_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-style auxiliary loss, per MoE layer and then averaged (1.0 when balanced).

    transformers' load_balancing_loss_func pools the tokens of all layers before it balances, so a
    layer can leave an expert unused while another layer over-uses it; this keeps each layer even.
    """
    losses = []
    for rl in router_logits:
        probs = torch.softmax(rl.float(), dim=-1)                       # [tokens, experts]
        n_exp = probs.shape[-1]
        top = probs.topk(top_k, dim=-1).indices
        frac = F.one_hot(top, n_exp).float().sum(1).mean(0) / top_k      # share of assignments
        losses.append(n_exp * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, total: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = model(input_ids=w[:, :-1]).logits
        tot += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
        n += w[:, 1:].numel()
    model.train()
    return tot / n


@torch.no_grad()
def expert_load(model, windows: torch.Tensor) -> list[list[float]]:
    out = model(input_ids=windows[:, :-1], output_router_logits=True)
    k = model.config.num_experts_per_tok
    loads = []
    for rl in out.router_logits:
        top = rl.topk(k, dim=-1).indices.flatten()
        c = torch.bincount(top, minlength=model.config.num_experts).float()
        loads.append([round(x, 3) for x in (c / c.sum()).tolist()])
    return loads


def samples_markdown(out_dir: Path, seed: int, max_new: int = 60) -> str:
    """Greedy and sampled continuations from the saved checkpoint (float32 compute)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    model.eval()
    lines = []

    def gen(ids, sample: bool):
        torch.manual_seed(seed)
        kw = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=50) if sample else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            o = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=max_new, repetition_penalty=None, **kw)
        return tok.decode(o[0, len(ids):], skip_special_tokens=False)

    def block(title, text):
        lines.extend([f"{title}:", "", "```text", text.strip(), "```", ""])

    for p in SAMPLE_PROMPTS:
        ids = tok.encode(p, add_special_tokens=False)
        lines.extend([f"#### Prompt: `{p}`", ""])
        block("Greedy continuation", gen(ids, False))
        block(f"Sampled continuation (temperature 0.8, top-p 0.95, top-k 50, seed {seed})", gen(ids, True))
    for p in CHAT_SAMPLE_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        lines.extend([f"#### Chat: user says `{p}`", ""])
        for s in (False, True):
            a = gen(ids, s).replace("<|im_end|>", "").replace("<|endoftext|>", "")
            block(f"Assistant ({'greedy' if not s else 'sampled'})", a)
    return "\n".join(lines)


def check_engine(out_dir: Path, binary: str, threads: int, max_tokens: int = 32,
                 atol: float = 1e-3) -> bool:
    """moemesh generate vs transformers (float32 compute on the BF16 weights, eager, no cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager",
                                                 experts_implementation="eager")
    model.eval()

    @torch.no_grad()
    def logits_of(seq):
        return model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float().numpy()

    def run(seq, n, npy):
        cmd = [binary, "generate", "--model", str(out_dir), "--prompt-ids", ",".join(map(str, seq)),
               "--max-tokens", str(n), "--ignore-eos", "--json", "--logits-out", str(npy),
               "--threads", str(threads)]
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if cp.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {cp.returncode}: {cp.stderr[-2000:]}")
        return json.loads(cp.stdout.strip().splitlines()[-1]), np.load(npy), " ".join(cmd)

    chat = tok.apply_chat_template([{"role": "user", "content": CHAT_SAMPLE_PROMPTS[0]}], tokenize=False,
                                   add_generation_prompt=True)
    ok_all = True
    with tempfile.TemporaryDirectory() as tmp:
        for text in (SAMPLE_PROMPTS[0], chat):
            prompt = tok.encode(text, add_special_tokens=False)
            seq, margins = list(prompt), []
            for _ in range(max_tokens):        # greedy, a full forward pass per token
                last = logits_of(seq)[-1]
                top2 = np.sort(last)[-2:]
                margins.append(float(top2[1] - top2[0]))
                seq.append(int(np.argmax(last)))
            greedy = seq[len(prompt):]
            ref = logits_of(prompt + greedy[:-1])
            r1, l1, cmd1 = run(prompt, max_tokens, Path(tmp) / "l1.npy")
            r2, l2, _ = run(prompt + greedy[:-1], 1, Path(tmp) / "l2.npy")
            same = [int(t) for t in r1["output_ids"]] == greedy
            d1 = float(np.abs(l1.astype(np.float64) - ref[:len(prompt)]).max()) if l1.shape == ref[:len(prompt)].shape else math.inf
            d2 = float(np.abs(l2.astype(np.float64) - ref).max()) if l2.shape == ref.shape else math.inf
            ok = same and d1 <= atol and d2 <= atol
            ok_all &= ok
            print(f"{'PASS' if ok else 'FAIL'} prompt {text!r}")
            print(f"  command: {cmd1}")
            print(f"  prompt ids ({len(prompt)}): {prompt}")
            print(f"  transformers greedy: {greedy}")
            print(f"  moemesh output_ids:  {r1['output_ids']}  -> {'equal' if same else 'DIFFERENT'}")
            print(f"  text: {tok.decode(greedy)!r}")
            print(f"  max |logit diff|: prompt rows {d1:.2e}, all {len(ref)} rows (prompt + 31 generated) "
                  f"{d2:.2e}; smallest greedy top-1/top-2 margin {min(margins):.3f}")
    return ok_all


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("models/demo"))
    ap.add_argument("--minutes", type=float, default=40.0,
                    help="wall-time budget for the whole run (training loop sized to fit)")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimiser steps (overrides the --minutes estimate; reproducible)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path,
                    default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moemesh-demo")
    ap.add_argument("--vocab", type=int, default=6144)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-intermediate", type=int, default=256)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.02,
                    help="weight of the per-layer router load-balancing loss")
    ap.add_argument("--chat-frac", type=float, default=0.15, help="share of windows from ChatML samples")
    ap.add_argument("--val-frac", type=float, default=0.02, help="held-out tail of each novel")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--samples-only", action="store_true", help="print samples from --out and exit")
    ap.add_argument("--check-engine", metavar="BINARY",
                    help="compare `BINARY generate` with transformers on --out and exit")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    t0 = time.time()
    args.out = args.out.resolve() if not args.out.is_absolute() else args.out

    if args.samples_only:
        print(samples_markdown(args.out, args.seed))
        return
    if args.check_engine:
        sys.exit(0 if check_engine(args.out, args.check_engine, args.threads) else 1)

    import transformers
    from transformers import GenerationConfig, Qwen3MoeForCausalLM
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    # ---- corpus
    novels, corpus_dir = load_novels(args.cache)
    train_docs, val_docs = [], []
    for name in NOVELS:
        paras = paragraphs_of(novels[name])
        n_val = max(1, int(len(paras) * args.val_frac))
        train_docs.append(paras[:-n_val])
        val_docs.append(paras[-n_val:])
    corpus_text = "\n\n".join("\n\n".join(d) for d in train_docs + val_docs)
    sha = hashlib.sha256(corpus_text.encode()).hexdigest()
    log(f"corpus: {CORPUS_PACKAGE} from {corpus_dir}: {len(NOVELS)} novels, "
        f"{sum(len(d) for d in train_docs)} train / {sum(len(d) for d in val_docs)} val paragraphs, "
        f"{len(corpus_text) / 1e6:.2f} MB of text, sha256 {sha[:16]}")

    rng = np.random.default_rng(args.seed)
    chat = make_chat_samples([p for d in train_docs for p in d], rng)
    log(f"chat samples: {len(chat)}; e.g. {chat[0][:160]!r}...")

    # ---- tokenizer
    tok = train_tokenizer([p for d in train_docs for p in d] + chat, args.vocab)
    vocab_size = tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    log(f"tokenizer: byte-level BPE, {vocab_size} tokens, specials {ids} ({time.time() - t0:.0f}s)")

    prose_ids, prose_starts = build_stream(tok, train_docs, "\n\n")
    val_ids, val_starts = build_stream(tok, val_docs, "\n\n")
    chat_ids, chat_starts = build_stream(tok, [chat], "<|endoftext|>")
    log(f"tokens: prose {len(prose_ids)}, chat {len(chat_ids)}, val {len(val_ids)} "
        f"({len(corpus_text) / (len(prose_ids) + len(val_ids)):.2f} chars/token)")

    T = args.seq_len
    prose = WindowSampler(prose_ids, prose_starts, T, args.seed + 1)
    chats = WindowSampler(chat_ids, chat_starts, T, args.seed + 2)
    vs = WindowSampler(val_ids, val_starts, T, args.seed + 3)
    val_windows = torch.from_numpy(np.stack([vs.next() for _ in range(min(24, len(vs.starts)))]))
    mix_rng = np.random.default_rng(args.seed + 4)

    # ---- model
    torch.manual_seed(args.seed)
    config = make_config(args, vocab_size, ids)
    config._attn_implementation = "sdpa"
    model = Qwen3MoeForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: qwen3_moe hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads "
        f"x {args.head_dim}, {args.experts} experts top-{args.top_k} x {args.moe_intermediate}, "
        f"{n_params / 1e6:.2f}M parameters ({2 * n_params / 2**20:.1f} MiB in BF16)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    # ---- training
    budget_s = args.minutes * 60
    total = args.steps if args.steps else 10**9
    calib_from = 5 if args.minutes < 10 else 10
    calib_at = 15 if args.minutes < 10 else max(20, min(60, args.warmup - 1))
    t_calib = None
    tokens_seen, prose_seen, step, history = 0, 0, 0, []
    train_start = time.time()
    ema = None
    while step < total:
        if step == calib_from:
            t_calib = time.time()
        if args.steps is None and step == calib_at:
            per_step = (time.time() - t_calib) / (calib_at - calib_from)
            evals_cost = 0.5 * per_step * len(val_windows) / args.batch
            left = budget_s - (time.time() - t0) - min(60.0, 0.15 * budget_s)   # saving, samples
            est = int(left / (per_step * (1 + evals_cost / (per_step * args.eval_every))))
            total = max(step + 1, step + est)
            log(f"schedule: {per_step:.2f} s/step -> {total} steps in the {args.minutes:g}-minute budget "
                f"(rerun with --steps {total} to reproduce)")
        rows = []
        for _ in range(args.batch):
            src = chats if mix_rng.random() < args.chat_frac else prose
            rows.append(src.next())
            prose_seen += T * (src is prose)
        batch = torch.from_numpy(np.stack(rows))
        lr = lr_at(step, total if total < 10**9 else 10**6, args)
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=batch[:, :-1], output_router_logits=True)
        ce = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        aux = load_balancing_loss(out.router_logits, args.top_k)
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        step += 1
        tokens_seen += batch[:, 1:].numel()
        ema = ce.item() if ema is None else 0.95 * ema + 0.05 * ce.item()
        el = time.time() - train_start
        if step % args.log_every == 0 or step == total:
            log(f"step {step:5d}/{total if total < 10**9 else '?'}  loss {ce.item():.4f} (ema {ema:.4f})  "
                f"aux {aux.item():.3f}  lr {lr:.2e}  gnorm {gnorm:.2f}  "
                f"{tokens_seen / el:.0f} tok/s  elapsed {time.time() - t0:.0f}s  "
                f"prose epochs {prose_seen / len(prose_ids):.2f}")
        if step % args.eval_every == 0 or step == total:
            vl = evaluate(model, val_windows, args.batch)
            history.append({"step": step, "train_loss_ema": round(ema, 4), "val_loss": round(vl, 4),
                            "elapsed_s": round(time.time() - t0, 1)})
            log(f"eval step {step}: val loss {vl:.4f} (ppl {math.exp(vl):.1f})")
        if time.time() - t0 > budget_s * 1.25 + 120:
            log("warning: far over the time budget; stopping early")
            break
    train_s = time.time() - train_start

    # ---- save
    args.out.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "model.safetensors.index.json"):
        (args.out / f).unlink(missing_ok=True)
    loads = expert_load(model, val_windows[:4])
    model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(args.out, safe_serialization=True)
    (args.out / "model.safetensors").chmod(0o644)
    GenerationConfig(
        bos_token_id=None, eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], do_sample=True, temperature=0.8, top_p=0.95, top_k=50,
    ).save_pretrained(args.out)
    write_tokenizer_files(tok, args.out)

    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    val_bf16 = evaluate(reloaded, val_windows, args.batch)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    info = {
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "reproduce_with": f"--steps {step} --seed {args.seed}",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "corpus": {"package": CORPUS_PACKAGE, "read_from": str(corpus_dir), "sha256": sha,
                   "chars": len(corpus_text), "chat_samples": len(chat)},
        "tokens": {"prose_train": int(len(prose_ids)), "chat": int(len(chat_ids)),
                   "val": int(len(val_ids)), "seen": tokens_seen},
        "parameters": n_params, "steps": step, "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "final_train_loss_ema": round(ema, 4), "final_val_loss_bf16": round(val_bf16, 4),
        "expert_load_per_layer": loads, "history": history,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (args.out / "train_log.json").write_text(json.dumps(info, indent=1) + "\n")
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    log(f"saved {args.out}: {size / 1e6:.2f} MB; {step} steps, {tokens_seen} tokens in {train_s / 60:.1f} min; "
        f"train loss (ema) {ema:.4f}, val loss (bf16 weights) {val_bf16:.4f}; expert load {loads}")
    print(samples_markdown(args.out, args.seed))
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
