#!/usr/bin/env python3
"""Decode step latency of Hugging Face transformers on a GPU, measured as cuda_decode_bench does.

For each batch size B: one batched prefill of B seeded random prompts of --prompt-len tokens, then
--steps greedy decode steps of all B with the KV cache (after 3 untimed ones), each timed between
two torch.cuda.synchronize() calls. Prints one JSON object per batch size, in the shape of
build/bin/cuda_decode_bench's lines, so scripts/gpu-check can put the two side by side. Needs torch
and transformers (present on the GPU machines; not a dependency of moemesh).

    python3 bench/hf_decode_bench.py --model DIR [--batches 1,32,128] [--prompt-len 128]
        [--steps 32]
"""
import argparse
import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)

    t0 = time.perf_counter()
    try:  # straight onto the device (needs accelerate)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16,
                                                     device_map=a.device)
    except (ValueError, ImportError):
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).to(a.device)
    model = model.eval()
    vocab = model.config.vocab_size
    print(f"hf_decode_bench: loaded {a.model} in {time.perf_counter() - t0:.1f} s "
          f"(transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"{a.device})", file=sys.stderr)

    for b in [int(x) for x in a.batches.split(",")]:
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (b, a.prompt_len), generator=gen).to(a.device)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for step in range(a.steps + 3):
                sync()
                t = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                sync()
                if step >= 3:
                    times.append((time.perf_counter() - t) * 1000)
        med = statistics.median(times)
        print(json.dumps({
            "bench": "cuda_decode", "engine": "transformers", "batch": b,
            "prompt_len": a.prompt_len, "steps": a.steps, "step_ms_median": round(med, 3),
            "step_ms_mean": round(statistics.mean(times), 3),
            "tokens_per_s": round(1000.0 * b / med, 1),
            "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
        }), flush=True)
        del past, out
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
