#!/usr/bin/env python3
"""Build small Hugging Face tokenizer.json files, one per tokenizer family, plus the ids and
decoded strings the Python `tokenizers` library produces for a fixed list of test strings.

Each fixture directory (tests/fixtures/tokenizers/<style>/) holds:
  tokenizer.json   a BPE trained here on TRAINING_TEXT, configured like that family's real
                   tokenizer.json (normalizer, pre-tokenizer, decoder, post-processor, added tokens)
  cases.json       {"tokenizers_version", "style", "description", "vocab_size",
                    "id_to_token": [...], "vocab": {token: id}, "special_ids": [...],
                    "cases": [{"text", "ids", "ids_no_special", "decoded_skip", "decoded_keep"}],
                    "decode_cases": [{"ids", "skip", "keep"}]}
                   ids = encode(text, add_special_tokens=True).ids, ids_no_special the same with
                   False; decoded_skip / decoded_keep = decode(ids, skip_special_tokens=True/False);
                   decode_cases decode arbitrary id lists (byte tokens that split a character,
                   specials, out-of-range ids) both ways.

The styles: gpt2, qwen2, llama3, deepseek_v3 (byte-level BPE families), llama2 (sentencepiece
BPE, legacy Prepend+Replace normalizer), mistral (sentencepiece BPE with a Metaspace
pre-tokenizer), and misc_bert, misc_split, misc_meta, misc_affix, which exercise the remaining
components and added-token flags (lstrip, rstrip, single_word, normalized) the families do not
use.

The regexes are those of the real families' tokenizer.json files. Nothing is downloaded.

Usage:
  /work/refenv/bin/python tools/make_tokenizer_fixtures.py [--out tests/fixtures/tokenizers]
      [--only STYLE] [--list]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

# ---------------------------------------------------------------------------------------------
# Training text: English prose, code, numbers, whitespace runs, and a little of many scripts.
TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. The dog did not care; it was asleep in the sun.
Tokenizers split text into pieces that a language model can read. A piece is often a word,
part of a word, a number, a space, or a punctuation mark. Good tokenizers keep common words
whole and break rare words into smaller parts. This text is used to train a tiny vocabulary.
She said: "I don't think we'll make it in time." He replied, "We've done harder things."
They're here, aren't they? It's true that you'd never know. I'm sure I'll be fine. Let's go!
IT'S LOUD. DON'T SHOUT. WE'VE HEARD YOU. Who's there? What've you done? The cat's toy.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 65536 3.14159 2.71828 1,000,000.
Dates like 2024-01-15 and times like 12:30:45 appear in logs. Prices: $5, $12.50, 99 cents.
Versions 1.2.3, ports 8080 and 443, phone 555-0100, ratio 16:9, percent 50% and 75%.

def tokenize(text, vocab):
    tokens = []
    for word in text.split():
        if word in vocab:
            tokens.append(vocab[word])
        else:
            tokens.extend(fallback(word))
    return tokens


class Encoder:
    def __init__(self, merges):
        self.merges = merges  # rank of each pair

    def encode(self, s: str) -> list[int]:
        return [ord(c) for c in s]

int main(int argc, char** argv) {
  for (int i = 0; i < argc; ++i) {
    std::printf("%s\\n", argv[i]);
  }
  return 0;
}

if (x == 1 && y != 2 || !z) { return {"key": [1, 2, 3], "other": null}; }
	Tabs	separate	these	words	and	lines.
Multiple   spaces   between   words,    and    trailing spaces   
   Leading spaces on this line.


Blank lines above and below.


Le café est très bon. Où est la bibliothèque ? Ça va très bien, merci. Élève, naïve, à bientôt.
Der Bär läuft über die Straße. Grüße aus München! Schöne Größe. Äpfel, Öl, Übung.
El niño comió mañana. ¿Dónde está la estación? ¡Qué bueno! Canción, corazón, señor.
Привет, как дела? Я люблю читать книги. Москва — столица России. Спасибо!
Καλημέρα! Η γλώσσα είναι όμορφη. Ευχαριστώ πολύ.
مرحبا بالعالم. كيف حالك؟ أنا بخير، شكرا. اللغة العربية جميلة.
שלום עולם. מה שלומך? תודה רבה.
नमस्ते दुनिया। आप कैसे हैं? मैं ठीक हूँ।
你好，世界！我喜欢学习语言。今天天气很好。中文分词很有意思。北京欢迎你。
日本語のテキストです。カタカナとひらがな、そして漢字。東京は大きい都市です。ありがとうございます。
안녕하세요 세계! 한국어 텍스트입니다. 감사합니다.
สวัสดีชาวโลก ภาษาไทย
Emoji: 😀 😃 😄 😁 😂 🤖 ❤️ 👍 👍🏽 🎉 🚀 🌍 👨‍👩‍👧‍👦 🏳️‍🌈 ✨ 🔥
Symbols: © ® ™ € £ ¥ § ¶ • … — – ≈ ≠ ≤ ≥ ∞ √ π Ω µ ° ± × ÷ → ← ↑ ↓
email@example.com https://example.org/path?q=1&r=2 C:\\Users\\name\\file.txt #hashtag @mention
"""


# ---------------------------------------------------------------------------------------------
# Pre-tokenizer regexes of the real families (as their tokenizer.json files hold them).
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
DEEPSEEK_REGEXES = [
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
]

# ---------------------------------------------------------------------------------------------
# Test strings shared by every style; each style adds strings with its own special tokens.
COMMON_TEXTS = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n\n",
    " \n \n",
    "a  b   c    d",
    "trailing spaces   ",
    "  leading",
    "   ",
    "\tTabbed\tline\t",
    "line1\nline2\r\nline3\r\n",
    "Hello world",
    "Hello, World! How are you?",
    "don't I'll we've they're she's he'd I'm",
    "DON'T WE'VE IT'S",
    "12345678",
    "3.14159",
    "1,234,567.89 and 2024-01-15",
    "x=42; y=3.0e-5",
    "I \u2764\ufe0f \U0001f916!",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family",
    "\U0001f44d\U0001f3fd thumbs \U0001f44b\U0001f3ff",
    "\U0001f3f3\ufe0f\u200d\U0001f308",
    "\U0001f600\U0001f603\U0001f604\U0001f601",
    "\U0001f9ea\U0001fae0 rare emoji",
    "你好，世界！",
    "日本語のテキストです。カタカナ",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "שלום עולם",
    "Привет, мир!",
    "Καλημέρα κόσμε",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "cafe\u0301 nai\u0308ve re\u0301sume\u0301",
    "caf\u00e9 \u00c5ngstr\u00f6m",
    "\uff21\uff22\uff23\uff11\uff12\uff13 \ufb01 \u2460\u2461 x\u00b2",
    "\u0130stanbul \u03a3\u039f\u03a6\u0399\u0391",
    "def foo(x):\n    return x * 2\n\n\nclass Bar:\n\tpass\n",
    "for (int i = 0; i < n; ++i) {\n  sum += a[i];\n}",
    'if x == 1 && y != 2 || !z: print("ok")',
    "The price is $12.50 (\u2248\u20ac11) \u2014 50% off!!!",
    "email@example.com https://example.org/path?q=1&r=2",
    "\u00a0nbsp\u3000ideographic\u2003em",
    "zero\u200bwidth a\u0085b",
    "x\u0301\u0302 \u0301start",
    "the quizzical zyxwvut",
    "The quick brown fox jumps over the lazy dog.",
    "__init__ self.merges = merges  # rank",
    "naïve \u2014 déjà vu, coöperate; ÆØÅ æøå",
]


def add(special_tokens=(), normal_tokens=()):
    return [("special", t) for t in special_tokens] + [("normal", t) for t in normal_tokens]


def alphabet(keep) -> list[str]:
    """The characters of TRAINING_TEXT that `keep` accepts, in code point order, and the
    sentencepiece space marker."""
    return sorted(c for c in set(TRAINING_TEXT) if keep(c)) + ["\u2581"]


def small_scripts(c: str) -> bool:
    """Latin, Greek, Cyrillic, Hebrew, Arabic and ASCII; not CJK, Hangul, Thai, Devanagari or
    emoji, which the sentencepiece styles must reach through byte fallback (or unk)."""
    return ord(c) < 0x0700


def train_bpe(tok: Tokenizer, vocab_size: int, *, special=(), byte_level=False,
              only_alphabet=None, **kw) -> Tokenizer:
    args = dict(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                special_tokens=list(special))
    if byte_level:
        args["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
    if only_alphabet is not None:
        # Exactly these characters (limit_alphabet alone breaks frequency ties at random).
        args["initial_alphabet"] = only_alphabet
        args["limit_alphabet"] = len(only_alphabet)
    args.update(kw)
    trainer = trainers.BpeTrainer(**args)
    lines = [line for line in TRAINING_TEXT.split("\n")]
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def edit_json(tok: Tokenizer, fn) -> Tokenizer:
    d = json.loads(tok.to_str())
    fn(d)
    return Tokenizer.from_str(json.dumps(d, ensure_ascii=False))


def append_vocab(d, tokens):
    """Adds vocab entries (no merges produce them) after the model's vocabulary."""
    vocab = d["model"]["vocab"]
    for t in tokens:
        if t not in vocab:
            vocab[t] = max(vocab.values()) + 1


def legacy_merges(d):
    """Stores the merges as "a b" strings, the format of older tokenizer.json files."""
    d["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in d["model"]["merges"]]


def insert_byte_tokens(d, first_id):
    """Inserts <0x00>..<0xFF> at ids first_id.. of the model vocab, as sentencepiece models do."""
    vocab = d["model"]["vocab"]
    shifted = {t: (i + 256 if i >= first_id else i) for t, i in vocab.items()}
    for b in range(256):
        shifted[f"<0x{b:02X}>"] = first_id + b
    d["model"]["vocab"] = dict(sorted(shifted.items(), key=lambda kv: kv[1]))
    for t in d["added_tokens"]:
        if t["id"] >= first_id:
            t["id"] += 256


# ---------------------------------------------------------------------------------------------
# The styles.

def style_gpt2():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    train_bpe(tok, 900, byte_level=True)
    tok = edit_json(tok, legacy_merges)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken(" indeed", special=False, normalized=False)])
    texts = ["<|endoftext|>", "Hello<|endoftext|>world", " <|endoftext|> spaced <|endoftext|>",
             "<|endoftext|><|endoftext|>", "<|endoftext", "That is true indeed indeed!"]
    return tok, texts, "GPT-2: ByteLevel pre-tokenizer with the GPT-2 regex; merges as strings"


def style_qwen2():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    train_bpe(tok, 1000, byte_level=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in
                            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in
                    ["<think>", "</think>", "<tool_call>"]])
    texts = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Hello! 你好<|im_end|>\n<|im_start|>assistant\n",
        "<think>\nLet me think.\n</think>\n\nThe answer is 42.<|im_end|>",
        "<|im_start|><|im_end|><|endoftext|>",
        " <|im_end|> ",
        "<tool_call>{\"name\": \"f\"}</tool_call>",
        "<|im_start", "<|im_end|>x<|im_end|>\n\n",
    ]
    return tok, texts, "Qwen2/Qwen3: NFC + Split(Qwen2 regex) + ByteLevel(use_regex=false)"


def style_llama3():
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    train_bpe(tok, 1000, byte_level=True)
    # Words in the vocab that no merge produces: ignore_merges makes them one token.
    tok = edit_json(tok, lambda d: append_vocab(d, ["\u0120quizzical", "\u0120zyxwvut"]))
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|reserved_special_token_0|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))]),
    ])
    texts = [
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>", "text<|end_of_text|>", "<|begin_of_text|>", "quizzical zyxwvut",
        "   <|eot_id|>   ",
    ]
    return tok, texts, ("Llama-3: Split(Llama-3 regex) + ByteLevel, BPE ignore_merges, "
                        "template <|begin_of_text|>")


def style_deepseek_v3():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False)
         for r in DEEPSEEK_REGEXES]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    train_bpe(tok, 1000, byte_level=True)
    bos = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    eos = "<\uff5cend\u2581of\u2581sentence\uff5c>"
    user, assistant = "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"
    tok.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in
                            [bos, eos, user, assistant]])
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in ["<think>", "</think>"]])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tok.token_to_id(bos))])
    texts = [
        f"{bos}{user}Hello, 世界!{assistant}<think>\nhmm\n</think>\n\nHi{eos}",
        f"{user}{assistant}", f" {eos} ", "123456789 12 1234", "中文分词很有意思。東京ひらがなカタカナ",
        "!Hello ?World ...abc", "a\u0300b\u0301c",
    ]
    return tok, texts, ("DeepSeek-V3: Sequence of Split regexes (digits, CJK ranges, words) + "
                        "ByteLevel")


SP_SPECIAL = ["<unk>", "<s>", "</s>"]


def sp_added(tok):
    tok.add_tokens([AddedToken("<extra_id>", special=False, normalized=False),
                    AddedToken("[INST]", special=True, normalized=False),
                    AddedToken("[/INST]", special=True, normalized=False)])


SP_TEXTS = [
    "<s>Hello</s>", "<s> Hello </s>", "[INST] What is 2+2? [/INST] 4</s>", "Hello <extra_id> world",
    "<unk>", " <s>", "</s></s>", "\u2581already\u2581meta", "\U0001f600", "\U0001f9ea",
    "\u4e2d\u6587 \u0915",
]


def style_llama2():
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always",
                                                 split=True)
    train_bpe(tok, 700, special=SP_SPECIAL, only_alphabet=alphabet(small_scripts))

    def to_llama(d):
        insert_byte_tokens(d, 3)
        d["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        d["pre_tokenizer"] = None
        d["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
        legacy_merges(d)
    tok = edit_json(tok, to_llama)
    sp_added(tok)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok, SP_TEXTS, ("Llama-2 sentencepiece (legacy): Prepend+Replace normalizer, BPE "
                           "byte_fallback + fuse_unk, Replace/ByteFallback/Fuse/Strip decoder")


def style_mistral():
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Trained on words (split=True), used on whole pieces (split=False) as Mistral's file is.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                 split=True)
    train_bpe(tok, 700, special=SP_SPECIAL, only_alphabet=alphabet(small_scripts))

    def to_mistral(d):
        insert_byte_tokens(d, 3)
        d["pre_tokenizer"]["split"] = False
        d["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"},
            {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
             "split": False}]}
    tok = edit_json(tok, to_mistral)
    sp_added(tok)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", 1), ("</s>", 2)])
    return tok, SP_TEXTS, ("Mistral/Llama sentencepiece (legacy=false): Metaspace prepend_scheme "
                           "first, BPE byte_fallback, ByteFallback + Metaspace decoder")


def style_misc_bert():
    tok = Tokenizer(models.BPE(unk_token="[UNK]", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKD(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(left=True, right=True)])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split("-", behavior="merged_with_previous"),
        pre_tokenizers.Split(Regex(r"[.,!?;:]"), behavior="removed"),
    ])
    train_bpe(tok, 500, special=["[UNK]", "[CLS]", "[SEP]", "[PAD]"],
              only_alphabet=alphabet(lambda c: c.isascii() and c.isprintable() and c != "_"))
    tok.add_special_tokens([AddedToken("[MASK]", special=True, lstrip=True, rstrip=False,
                                       normalized=False)])
    tok.add_tokens([AddedToken("New York", special=False, normalized=True),
                    AddedToken("cat", special=False, single_word=True, normalized=False),
                    AddedToken("<sep>", special=False, rstrip=True, normalized=False)])
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    texts = [
        "The  [MASK] sat.", "a [MASK]", "[MASK]", "Visit new york and NEW YORK, New York!",
        "cat concat cats cat. (cat) _cat cat_", "one-two-three --x", "x <sep>   y <sep>",
        "Wow!!! Really? yes; no: maybe.", "ＨＥＬＬＯ Ⅻ ½", "  [MASK]  [MASK]",
    ]
    return tok, texts, ("components: NFKD, Lowercase, Replace(regex), Strip, WhitespaceSplit, "
                        "Digits, Split behaviors, BPE unk without fuse, BertProcessing, "
                        "no decoder, lstrip/single_word/rstrip/normalized added tokens")


def style_misc_split():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([
        normalizers.NFD(), normalizers.Replace("``", '"'), normalizers.NFC()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(),
        pre_tokenizers.Split(Regex(r"[aeiou]"), behavior="contiguous", invert=True),
        pre_tokenizers.Split(Regex(r"\d"), behavior="merged_with_next"),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True),
    ])
    tok.decoder = decoders.Sequence([
        decoders.ByteLevel(),
        decoders.Replace("  ", " "),
        decoders.Strip(content=" ", left=2, right=0),
    ])
    train_bpe(tok, 600, byte_level=True)
    tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, rstrip=True,
                                       normalized=False),
                            AddedToken("<pad>", special=True, normalized=False),
                            AddedToken("</s>", special=True, normalized=False),
                            AddedToken("<s>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("caf\u00e9", special=False, normalized=True)])
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    texts = [
        "Hello <mask> world", "Hello<mask>world", "  <mask>  ", "<pad><mask><pad>",
        "``quoted`` text", "cafe\u0301 and caf\u00e9", "ab12cd345ef6", "aeiou xyz aaxxee",
        "Ⅻ² x\u200dy snake_case",
    ]
    return tok, texts, ("components: NFD/NFC, Replace(string), Whitespace, Split invert + "
                        "contiguous/merged_with_next, Digits, ByteLevel add_prefix_space, "
                        "Replace/Strip decoders, RobertaProcessing, lstrip+rstrip <mask>")


def style_misc_meta():
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([
        normalizers.Strip(left=True, right=False), normalizers.NFKC(), normalizers.Lowercase(),
        normalizers.Replace(Regex("[0-9]+"), "0")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always",
                                                 split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    train_bpe(tok, 500, special=["<unk>", "<bos>", "<eos>"],
              only_alphabet=alphabet(lambda c: c.isascii() and c.isprintable()))
    tok.add_special_tokens([AddedToken("<bos>", special=True, normalized=False),
                            AddedToken("<eos>", special=True, normalized=False),
                            AddedToken("<sys>", special=True, rstrip=True, normalized=True)])
    tok.add_tokens([AddedToken("hello world", special=False, normalized=True),
                    AddedToken("\u2581x\u2581", special=False, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B:1 <eos>:1",
        special_tokens=[("<bos>", tok.token_to_id("<bos>")), ("<eos>", tok.token_to_id("<eos>"))])
    texts = [
        "<sys>   You are here.<eos>", "Hello World and HELLO WORLD", "  <SYS> upper",
        "\u2581x\u2581 and  x ", "abc 123 4567", "\u00e6\u0153\U0001f600\U0001f601zzz",
        "<bos><bos>",
    ]
    return tok, texts, ("components: Strip(left), NFKC, Lowercase, Replace(regex), Metaspace "
                        "prepend always + split, Metaspace decoder, BPE unk + fuse_unk, "
                        "TemplateProcessing with two specials, normalized special tokens")


def train_affix_bpe(n_merges: int, prefix: str, suffix: str):
    """A small deterministic BPE trainer (tokenizers' own trainer orders a vocabulary with
    continuing_subword_prefix differently from run to run): words of the Whitespace
    pre-tokenizer, the most frequent pair first, ties to the smallest pair."""
    from collections import Counter
    words = Counter()
    for line in TRAINING_TEXT.split("\n"):
        for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(line):
            if w.isascii():
                words[w] += 1
    split = {}
    for w in words:
        syms = [c if i == 0 else prefix + c for i, c in enumerate(w)]
        syms[-1] += suffix
        split[w] = syms
    vocab = sorted({s for syms in split.values() for s in syms})
    merges = []
    for _ in range(n_merges):
        counts = Counter()
        for w, syms in split.items():
            for a, b in zip(syms, syms[1:]):
                counts[(a, b)] += words[w]
        if not counts:
            break
        (a, b), _ = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = a + b[len(prefix):]
        merges.append([a, b])
        if merged not in vocab:
            vocab.append(merged)
        for w, syms in split.items():
            k, out = 0, []
            while k < len(syms):
                if k + 1 < len(syms) and syms[k] == a and syms[k + 1] == b:
                    out.append(merged)
                    k += 2
                else:
                    out.append(syms[k])
                    k += 1
            split[w] = out
    return {t: i + 1 for i, t in enumerate(vocab)} | {"<unk>": 0}, merges


def style_misc_affix():
    vocab, merges = train_affix_bpe(300, "##", "</w>")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>",
                               continuing_subword_prefix="##", end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<unk>", special=True, normalized=False),
                            AddedToken("<eos>", special=True, normalized=False)])
    texts = ["tokenizers split words", "a b c", "x", "unknown \u4e2d\u6587 chars<eos>"]
    return tok, texts, ("components: BPE continuing_subword_prefix + end_of_word_suffix with unk, "
                        "Whitespace pre-tokenizer, no decoder, no post-processor")


STYLES = {
    "gpt2": style_gpt2,
    "qwen2": style_qwen2,
    "llama3": style_llama3,
    "deepseek_v3": style_deepseek_v3,
    "llama2": style_llama2,
    "mistral": style_mistral,
    "misc_bert": style_misc_bert,
    "misc_split": style_misc_split,
    "misc_meta": style_misc_meta,
    "misc_affix": style_misc_affix,
}


# ---------------------------------------------------------------------------------------------

def decode_id_lists(tok: Tokenizer, rng: random.Random):
    """Id lists to decode: random ids (specials included), single ids, byte tokens that split
    a character, and ids beyond the vocabulary (decode skips them)."""
    n = tok.get_vocab_size(with_added_tokens=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    lists = [[], [n + 5], [0, n, n + 100, 1]]
    for _ in range(20):
        lists.append([rng.randrange(n) for _ in range(rng.randint(1, 12))])
    for i in range(0, n, max(1, n // 40)):
        lists.append([i])
    byte_level = "\u0120" in vocab  # 'Ġ': the byte-level alphabet
    if byte_level:
        # The byte-level characters of the bytes of U+1F600 and of U+20AC.
        bl = {b: c for b, c in zip(range(256), bytes_to_unicode())}
        for seq in ([0xF0], [0xF0, 0x9F], [0xF0, 0x9F, 0x98], [0xF0, 0x9F, 0x98, 0x80],
                    [0xE2, 0x82, 0xAC, 0x80], [0x9F, 0x41], [0xF0, 0x41]):
            lists.append([vocab[bl[b]] for b in seq])
    if "<0x41>" in vocab:
        for seq in ([0xF0], [0xF0, 0x9F], [0xF0, 0x9F, 0x98, 0x80], [0xE2, 0x82, 0xAC, 0x80],
                    [0xE2, 0x82, 0xAC, 0x41], [0x80, 0x80]):
            ids = [vocab[f"<0x{b:02X}>"] for b in seq]
            lists.append(ids)
            lists.append([vocab["\u2581a"] if "\u2581a" in vocab else 0] + ids + [ids[0]])
    return lists


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + \
        list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def build(style: str, out: Path) -> None:
    tok, extra_texts, description = STYLES[style]()
    d = out / style
    d.mkdir(parents=True, exist_ok=True)
    path = d / "tokenizer.json"
    tok.save(str(path), pretty=False)
    tok = Tokenizer.from_file(str(path))  # the reference is the saved file, as C++ reads it
    cases = []
    for text in COMMON_TEXTS + extra_texts:
        ids = tok.encode(text, add_special_tokens=True).ids
        cases.append({
            "text": text,
            "ids": ids,
            "ids_no_special": tok.encode(text, add_special_tokens=False).ids,
            "decoded_skip": tok.decode(ids, skip_special_tokens=True),
            "decoded_keep": tok.decode(ids, skip_special_tokens=False),
        })
    rng = random.Random(1234)
    decode_cases = [{"ids": ids, "skip": tok.decode(ids, skip_special_tokens=True),
                     "keep": tok.decode(ids, skip_special_tokens=False)}
                    for ids in decode_id_lists(tok, rng)]
    n = tok.get_vocab_size(with_added_tokens=True)
    result = {
        "tokenizers_version": tokenizers.__version__,
        "style": style,
        "description": description,
        "vocab_size": n,
        # id_to_token of every id (a normalized added token reads as its normalized content)
        # and token_to_id of every entry of get_vocab(with_added_tokens=True).
        "id_to_token": [tok.id_to_token(i) for i in range(n + 2)],
        "vocab": dict(sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])),
        "special_ids": sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special),
        "cases": cases,
        "decode_cases": decode_cases,
    }
    with open(d / "cases.json", "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=True, indent=None, separators=(",", ":"))
        f.write("\n")
    size = path.stat().st_size + (d / "cases.json").stat().st_size
    print(f"{style}: {len(cases)} cases, {len(decode_cases)} decode cases, "
          f"vocab {result['vocab_size']}, {size / 1024:.1f} KiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" /
                                         "fixtures" / "tokenizers"))
    ap.add_argument("--only", choices=sorted(STYLES))
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for name, fn in STYLES.items():
            print(name)
        return 0
    out = Path(args.out)
    for style in ([args.only] if args.only else STYLES):
        build(style, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
