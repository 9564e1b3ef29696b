#!/usr/bin/env python3
"""Decode throughput of the disaggregated cluster against a single process, in one run.

Starts `moemesh serve --single-process` and `moemesh serve` (gateway+router, one attention worker
and --expert-workers expert workers over UCX) on the same model, and for each batch size runs
that many concurrent streaming completions (greedy, ignore_eos, fixed prompt and length).
Tokens/s is every streamed token over the wall time from sending the requests to the last token
(prefill of the short prompts included; with --tokens 128 it is a small share). Prints a table and the ratio
cluster / single process per batch size.

    .venv/bin/python bench/cluster_decode_bench.py [--model DIR] [--batches 1,16] [--tokens 128]
        [--expert-workers 2] [--transports sm] [--repeats 3]
"""
import argparse
import os
import pathlib
import statistics
import sys
import time

from serving import Serve, run_streams

ROOT = pathlib.Path(__file__).resolve().parents[1]


def decode_rate(server, batch, tokens):
    start, out = run_streams(server, [f"Chapter {i}. It is a truth universally" for i in range(batch)],
                             tokens)
    tokens = sum(len(ts) for ts in out.values())
    return tokens / (max(ts[-1] for ts in out.values()) - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "demo"))
    ap.add_argument("--binary", default=str(ROOT / "build" / "bin" / "moemesh"))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--expert-workers", type=int, default=2)
    ap.add_argument("--transports", default="")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cluster-args", default="",
                    help="extra flags for the cluster's serve, e.g. \"--threads 1\"")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]

    extra = ["--transports", a.transports] if a.transports else []
    configs = [("single process", ["--single-process"]),
               (f"cluster ({a.expert_workers} expert workers{', ' + a.transports if a.transports else ''})",
                ["--expert-workers", str(a.expert_workers), *extra, *a.cluster_args.split()])]
    rates = {}
    for name, args in configs:
        print(f"starting {name} ...", file=sys.stderr)
        s = Serve(a.binary, a.model, *args)
        try:
            decode_rate(s, 2, 8)  # warm up
            for b in batches:
                runs = [decode_rate(s, b, a.tokens) for _ in range(a.repeats)]
                rates[(name, b)] = statistics.median(runs)
                print(f"  batch {b}: {rates[(name, b)]:.1f} tok/s (runs: "
                      + ", ".join(f"{r:.1f}" for r in runs) + ")", file=sys.stderr)
        finally:
            s.stop()

    single, clustered = configs[0][0], configs[1][0]
    print(f"model {a.model}, {a.tokens} tokens per stream, median of {a.repeats} runs, "
          f"{os.cpu_count()} CPUs")
    print(f"| batch | single process tok/s | {clustered} tok/s | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for b in batches:
        r1, r2 = rates[(single, b)], rates[(clustered, b)]
        print(f"| {b} | {r1:.1f} | {r2:.1f} | {r2 / r1:.2f} |")


if __name__ == "__main__":
    main()
