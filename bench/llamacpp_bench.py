#!/usr/bin/env python3
"""moemesh against llama.cpp on the CPU: batch-1 decode and 512-token prefill, same model, same run.

In one run on one machine, with the same number of threads for both:

  1. writes an OLMoE-shaped synthetic checkpoint (tools/make_synthetic_model.py --preset olmoe:
     hidden 2048, 64 experts, top 8, expert width 1024, 16 heads; --layers layers; random BF16
     weights), unless --model names one;
  2. fetches llama.cpp's source (the llama-cpp-python source distribution from PyPI, which vendors
     it under vendor/llama.cpp, with convert_hf_to_gguf.py and the gguf package) and builds
     llama-bench with CMake (CPU only, GGML_NATIVE=ON, Release); source and build are kept in
     --work-dir and reused by later runs;
  3. converts the checkpoint to GGUF twice with llama.cpp's convert_hf_to_gguf.py: BF16, and Q8_0
     (int8 in blocks of 32 with an f16 scale per block); cached in --work-dir;
  4. measures, in --repeats interleaved rounds (on a shared machine a busy moment then hits both
     engines), llama.cpp with `llama-bench -t T -p P -n N -r 1` (pp P: prefill of a P-token
     prompt; tg N: N decode steps from an empty context, batch 1; after its own warm-up run) and
     moemesh with `moemesh generate --threads T --ignore-eos --json` (BF16: the checkpoint's
     dtype; Q8_0's peer: `--quantization int8`, int8 with a float32 scale per row), whose
     "timing" gives the seconds of the prompt's forward pass and of the decode steps (model
     load not included, as in llama-bench):
        decode  tok/s = N / decode seconds (1-token prompt, N + 1 tokens: N decode steps)
        prefill tok/s = P / prefill seconds (P-token prompt, 1 token)
     each figure, for both engines, the best of the rounds. Should llama-bench
     crash with its extra buffer types (AMX, repacked weights), it runs with `--repack 0`, and the
     output says so;
  5. prints a table with the ratios moemesh / llama.cpp and whether the targets (decode >= 1.2x,
     prefill >= 2x, at batch 1) are met.

The converter runs on --convert-python (default: this interpreter), which needs torch, numpy and
transformers (its own gguf package is put on its path). The synthetic checkpoint carries the demo
model's byte-level BPE tokenizer, whose pre-tokenizer is Qwen2's split regex; the converter knows
tokenizers by a hash of their output on a test text, which a new vocabulary cannot match, so when
the regex is Qwen2's the converter is told "qwen2" (the vocabulary only matters for the test
prompts' token ids here: both engines get token ids).

    .venv/bin/python bench/llamacpp_bench.py [--work-dir DIR] [--layers 2] [--threads N]
        [--prompt-tokens 512] [--decode-tokens 64] [--repeats 5] [--model DIR]
        [--convert-python PY] [--binary build/bin/moemesh] [--llamacpp-version 0.3.36]
        [--formats bf16,q8_0] [--jobs 2] [--isa amx]
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF",
               "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DGGML_OPENMP=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"]
# What `--quantization` moemesh compares with each GGUF type.
MOEMESH_QUANT = {"bf16": "none", "q8_0": "int8"}
TARGETS = {"decode": 1.2, "prefill": 2.0}

# Runs convert_hf_to_gguf.py, telling it "qwen2" for a tokenizer whose hash it does not know
# (only called when the checkpoint's pre-tokenizer regex is Qwen2's).
CONVERT_WRAPPER = r"""
import runpy, sys
src = sys.argv[1]
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
sys.path.insert(0, src)
sys.path.insert(1, src + "/gguf-py")
import conversion.base as base
orig = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        print("llamacpp_bench: unknown tokenizer hash; its pre-tokenizer regex is Qwen2's: 'qwen2'",
              file=sys.stderr)
        return "qwen2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, **kw):
    log("$ " + " ".join("<wrapper>" if c == CONVERT_WRAPPER else str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def llamacpp_source(work, version):
    """vendor/llama.cpp of the llama-cpp-python source distribution, downloaded once."""
    src = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").exists():
        return src
    sdist = work / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        # Only llama-cpp-python from source; its build dependencies (needed to read its metadata)
        # come as wheels.
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
             "llama-cpp-python", f"llama-cpp-python=={version}", "-d", work])
    with tarfile.open(sdist) as t:
        try:
            t.extractall(work, filter="data")
        except TypeError:  # Python < 3.11.4: no extraction filters
            t.extractall(work)
    if not (src / "convert_hf_to_gguf.py").exists():
        sys.exit(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    return src


def build_llamacpp(work, src, jobs):
    build = work / "build"
    stamp = build / "moemesh-bench-source.txt"
    exe = build / "bin" / "llama-bench"
    if stamp.exists() and stamp.read_text() != str(src):
        shutil.rmtree(build)  # built from another llama.cpp
    if exe.exists() and stamp.exists():
        return exe
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(["cmake", "-S", src, "-B", build, *gen, *CMAKE_FLAGS])
    run(["cmake", "--build", build, "-j", str(jobs), "--target", "llama-bench"])
    stamp.write_text(str(src))
    return exe


def convert(src, model, out, outtype, python):
    if out.exists() and out.stat().st_mtime > (model / "model.safetensors").stat().st_mtime:
        return out
    tok = json.loads((model / "tokenizer.json").read_text())
    pre = json.dumps(tok.get("pre_tokenizer"))
    wrapper = json.dumps(QWEN2_SPLIT)[1:-1] in pre
    tmp = out.with_suffix(".tmp")
    args = [model, "--outtype", outtype, "--outfile", tmp]
    if wrapper:
        run([python, "-c", CONVERT_WRAPPER, src, *args])
    else:
        run([python, src / "convert_hf_to_gguf.py", *args])
    tmp.rename(out)
    return out


def llama_bench(exe, gguf, threads, prompt, decode, repack):
    """One llama-bench run of a P-token prefill and N decode steps (after its own warm-up run):
    {"prefill": tok/s, "decode": tok/s} and the build commit, or None when llama-bench crashed."""
    cmd = [exe, "-m", gguf, "-t", threads, "-p", prompt, "-n", decode, "-r", 1, "-o", "json",
           "--repack", 1 if repack else 0]
    log("$ " + " ".join(str(c) for c in cmd))
    res = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        return None, ""
    out, commit = {}, ""
    for test in json.loads(res.stdout):
        commit = test.get("build_commit", "")
        out["prefill" if test["n_prompt"] > 0 else "decode"] = test["avg_ts"]
    return out, commit


class Moemesh:
    """`moemesh generate --json`, timed by its own figures: the prompt's forward pass and the
    decode steps after it (model load and start-up not included, as in llama-bench)."""

    def __init__(self, binary, model, quant, threads, vocab, isa=None):
        self.binary, self.model, self.quant, self.threads, self.vocab = (binary, model, quant,
                                                                         threads, vocab)
        self.env = {**os.environ, **({"MOEMESH_ISA": isa} if isa else {})}

    def timing(self, n_prompt, n_out):
        ids = ",".join(str((i * 104729 + 7919) % (self.vocab - 3) + 3) for i in range(n_prompt))
        cmd = [self.binary, "generate", "--model", self.model, "--prompt-ids", ids,
               "--max-tokens", str(n_out), "--ignore-eos", "--threads", str(self.threads),
               "--quantization", self.quant, "--json"]
        res = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=self.env)
        if res.returncode != 0:
            sys.exit(f"moemesh generate failed: {res.stderr.strip()}")
        out = json.loads(res.stdout)
        if len(out["output_ids"]) != n_out:
            sys.exit(f"moemesh generate gave {len(out['output_ids'])} tokens, not {n_out}")
        return out["timing"]

    def round(self, prompt, decode):
        """{"prefill": tok/s of a `prompt`-token prompt, "decode": tok/s of `decode` steps at
        batch 1 after a 1-token prompt}."""
        t = self.timing(1, decode + 1)
        p = self.timing(prompt, 1)
        return {"prefill": prompt / p["prefill_seconds"],
                "decode": t["decode_steps"] / t["decode_seconds"]}


def measure(exe, gguf, mm, threads, prompt, decode, rounds):
    """Interleaved rounds of llama-bench and moemesh (the machine may be shared: a busy moment
    then hits both), the best of each figure over the rounds."""
    mm.timing(1, 1)  # warm the page cache
    repack, note, commit = True, "", ""
    ll = {"prefill": [], "decode": []}
    mm_runs = {"prefill": [], "decode": []}
    for r in range(rounds):
        got, commit = llama_bench(exe, gguf, threads, prompt, decode, repack)
        if got is None and repack:
            # On a KVM guest listing amx_int8, llama.cpp's AMX kernel (an extra buffer type, used
            # for Q8_0) died of a general protection fault in ldtilecfg: run without extra
            # buffer types, as llama.cpp's own --repack 0 does, and say so.
            repack, note = False, "llama-bench crashed with its extra buffer types (AMX); --repack 0"
            log(f"  {note}")
            got, commit = llama_bench(exe, gguf, threads, prompt, decode, repack)
        if got is None:
            sys.exit(f"llama-bench failed on {gguf}")
        mine = mm.round(prompt, decode)
        for k in ll:
            ll[k].append(got[k])
            mm_runs[k].append(mine[k])
        log(f"  round {r}: llama.cpp prefill {got['prefill']:.1f} tok/s, decode "
            f"{got['decode']:.2f} tok/s; moemesh prefill {mine['prefill']:.1f} tok/s, decode "
            f"{mine['decode']:.2f} tok/s")
    llama = {k: max(v) for k, v in ll.items()}
    moemesh = {k: max(v) for k, v in mm_runs.items()}
    return llama, moemesh, note, commit


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", type=pathlib.Path,
                    default=pathlib.Path.home() / ".cache" / "moemesh" / "llamacpp-bench",
                    help="llama.cpp source, build, GGUF files and the synthetic checkpoint")
    ap.add_argument("--model", type=pathlib.Path,
                    help="checkpoint directory (default: an OLMoE-shaped synthetic one)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5,
                    help="interleaved rounds of both engines; each figure is the best round")
    ap.add_argument("--binary", default=str(ROOT / "build" / "bin" / "moemesh"))
    ap.add_argument("--convert-python", default=sys.executable,
                    help="Python with torch, numpy and transformers for convert_hf_to_gguf.py")
    ap.add_argument("--llamacpp-version", default="0.3.36",
                    help="llama-cpp-python version whose vendored llama.cpp is built")
    ap.add_argument("--formats", default="bf16,q8_0")
    ap.add_argument("--isa", help="MOEMESH_ISA for moemesh's runs (e.g. amx: BF16 weights on AMX "
                    "tiles with bf16 activations; default: the kernels' own choice)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="build jobs for llama.cpp")
    a = ap.parse_args()
    formats = [f for f in a.formats.split(",") if f]
    for f in formats:
        if f not in MOEMESH_QUANT:
            sys.exit(f"--formats: unknown {f!r} (bf16, q8_0)")
    work = a.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    model = a.model
    if model is None:
        model = work / f"olmoe-synthetic-{a.layers}"
        if not (model / "model.safetensors").exists():
            run([sys.executable, ROOT / "tools" / "make_synthetic_model.py", model, "--preset",
                 "olmoe", "--layers", a.layers])
    model = model.resolve()
    config = json.loads((model / "config.json").read_text())

    src = llamacpp_source(work, a.llamacpp_version)
    exe = build_llamacpp(work, src, a.jobs)
    ggufs = {f: convert(src, model, work / f"{model.name}-{f}.gguf", f, a.convert_python)
             for f in formats}

    load_before = os.getloadavg()[0]
    rows, commit = [], ""
    for f in formats:
        log(f"{f}: llama.cpp against moemesh --quantization {MOEMESH_QUANT[f]} ...")
        mm = Moemesh(a.binary, model, MOEMESH_QUANT[f], a.threads, config["vocab_size"], a.isa)
        ll, mmr, note, commit = measure(exe, ggufs[f], mm, a.threads, a.prompt_tokens,
                                        a.decode_tokens, a.repeats)
        rows.append((f, ll, mmr, note))

    print(f"model {model.name}: {config['num_hidden_layers']} layers, hidden "
          f"{config['hidden_size']}, {config.get('num_local_experts', config.get('num_experts'))}"
          f" experts top {config['num_experts_per_tok']}, expert width "
          f"{config['moe_intermediate_size']}; {a.threads} threads, {os.cpu_count()} CPUs; "
          f"moemesh ISA {a.isa or 'default'}; "
          f"llama.cpp {commit} (llama-cpp-python {a.llamacpp_version}); 1-minute load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| weights (llama.cpp / moemesh) | measure | llama.cpp tok/s | moemesh tok/s "
          "| moemesh / llama.cpp | target | met |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for f, ll, mm, _ in rows:
        int8 = "int8 (per row)" + (", int8 activations" if a.isa == "amx" else "")
        names = f"{f.upper()} / {'BF16' if MOEMESH_QUANT[f] == 'none' else int8}"
        for key, label in (("decode", f"decode, batch 1, {a.decode_tokens} tokens"),
                           ("prefill", f"prefill, {a.prompt_tokens}-token prompt")):
            r = mm[key] / ll[key]
            t = TARGETS[key]
            print(f"| {names} | {label} | {ll[key]:.2f} | {mm[key]:.2f} "
                  f"| {r:.2f}x | {t:.1f}x | {'yes' if r >= t else 'no'} |")
    for f, _, _, note in rows:
        if note:
            print(f"llama.cpp {f.upper()}: {note}")
    print(f"best of {a.repeats} interleaved rounds each")


if __name__ == "__main__":
    main()
