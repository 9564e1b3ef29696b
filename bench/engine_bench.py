#!/usr/bin/env python3
"""The engine under load: output tokens/s by concurrency, and prefix caching's effect on TTFT.

Starts `moemesh serve --single-process` on a model (by default an OLMoE-shaped synthetic checkpoint
that tools/make_synthetic_model.py writes first: OLMoE-1B-7B's shapes with --layers layers) and
measures, in one run on one machine:

  1. output tokens/s with 1, 4, 16 and 64 concurrent streaming completions (greedy, ignore_eos,
     distinct prompts of --prompt-tokens token ids, --tokens tokens each): all output tokens over
     the wall time from sending the requests to the last token;
  2. the time to first token (a one-token completion, end to end) of a --ttft-tokens-token
     prompt sent for the first time (uncached) and sent again (its full blocks found in the
     prefix cache), each the median of --repeats distinct prompts.

Prints a table and the two ratios the engine is judged by (tokens/s at 16 over 1, cached TTFT
over uncached).

    .venv/bin/python bench/engine_bench.py [--model DIR] [--layers 2] [--concurrency 1,4,16,64]
        [--tokens 32] [--prompt-tokens 64] [--ttft-tokens 2000] [--repeats 3] [--serve-args ...]
"""
import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time

from serving import Serve, one_stream, run_streams

ROOT = pathlib.Path(__file__).resolve().parents[1]


def prompt_ids(seed, n, vocab):
    return [(seed * 7919 + i * 104729 + (i * i) % 997) % (vocab - 2) + 1 for i in range(n)]


def throughput(server, concurrency, prompt_tokens, tokens, vocab, seed):
    start, out = run_streams(server, [prompt_ids(seed + i, prompt_tokens, vocab)
                                      for i in range(concurrency)], tokens)
    # ignore_eos: every stream produced exactly `tokens` tokens (some chunks may carry no text
    # while a character is incomplete, so chunks are not counted).
    end = max(ts[-1] for ts in out.values() if ts)
    return concurrency * tokens / (end - start)


def ttft(server, prompt):
    """The time to the end of a one-token completion: the prompt's prefill and one sample."""
    out = {}
    start = time.perf_counter()
    one_stream(server.port, server.model_id, prompt, 1, out, 0)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: a synthetic OLMoE-shaped one)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--binary", default=str(ROOT / "build" / "bin" / "moemesh"))
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--ttft-tokens", type=int, default=2000, help="0: no TTFT measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--serve-args", default="", help="extra flags for moemesh serve")
    a = ap.parse_args()

    model = a.model
    if not model:
        model = f"/tmp/moemesh-olmoe-synthetic-{a.layers}"
        if not (pathlib.Path(model) / "model.safetensors").exists():
            print(f"writing {model} ...", file=sys.stderr)
            subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_model.py"), model,
                            "--preset", "olmoe", "--layers", str(a.layers)], check=True)
    vocab = __import__("json").loads((pathlib.Path(model) / "config.json").read_text())["vocab_size"]

    print(f"starting moemesh serve on {model} ...", file=sys.stderr)
    s = Serve(a.binary, model, "--single-process", "--max-num-seqs", "64",
              *a.serve_args.split())
    try:
        throughput(s, 2, 8, 4, vocab, 10_000)  # warm up
        rates = {}
        for c in [int(x) for x in a.concurrency.split(",")]:
            rates[c] = throughput(s, c, a.prompt_tokens, a.tokens, vocab, 1000 * c)
            print(f"  concurrency {c}: {rates[c]:.1f} output tok/s", file=sys.stderr)
        cold, warm = [], []
        for r in range(a.repeats if a.ttft_tokens > 0 else 0):
            p = prompt_ids(50_000 + r, a.ttft_tokens, vocab)
            cold.append(ttft(s, p))
            warm.append(ttft(s, p))
            print(f"  TTFT {a.ttft_tokens} tokens: uncached {cold[-1] * 1000:.0f} ms, "
                  f"cached {warm[-1] * 1000:.0f} ms", file=sys.stderr)
    finally:
        s.stop()

    print(f"model {model}, {os.cpu_count()} CPUs, {a.prompt_tokens}-token prompts, "
          f"{a.tokens} tokens per stream")
    print("| concurrency | output tok/s | vs concurrency 1 |")
    print("| ---: | ---: | ---: |")
    base = rates.get(1)
    for c, r in rates.items():
        print(f"| {c} | {r:.1f} | {r / base:.2f}x |" if base else f"| {c} | {r:.1f} | - |")
    if cold:
        cm, wm = statistics.median(cold), statistics.median(warm)
        print(f"TTFT of a {a.ttft_tokens}-token prompt (median of {a.repeats}): uncached "
              f"{cm * 1000:.0f} ms, cached {wm * 1000:.0f} ms, ratio {wm / cm:.3f}")


if __name__ == "__main__":
    main()
