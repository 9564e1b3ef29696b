#!/usr/bin/env bash
# Serving benchmark with an unmodified client from PyPI (aiperf): starts `moemesh serve` on the
# demo model (or $MODEL), runs aiperf's chat benchmark against it (streaming, synthetic prompts),
# and prints aiperf's summary. aiperf lives in its own virtual environment (.venv-bench), pinned
# by bench/requirements-bench.txt; nothing of it is part of the build.
#
#   bench/serve_bench.sh [--concurrency N] [--requests N] [--input-tokens N] [--output-tokens N]
set -euo pipefail
cd "$(dirname "$0")/.."
concurrency=4 requests=32 isl=128 osl=64
while (($#)); do
  case "$1" in
    --concurrency) concurrency=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --input-tokens) isl=$2; shift 2 ;;
    --output-tokens) osl=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
model="${MODEL:-models/demo}"
scripts/setup >/dev/null
if [ ! -x .venv-bench/bin/aiperf ]; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install -q -r bench/requirements-bench.txt
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
build/bin/moemesh serve --model "$model" --port "$port" --max-num-seqs "$concurrency" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 1
done
name=$(curl -s "http://127.0.0.1:$port/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
out=$(mktemp -d)
.venv-bench/bin/aiperf profile --model "$name" --url "http://127.0.0.1:$port" --endpoint-type chat \
  --streaming --tokenizer "$model" --concurrency "$concurrency" --request-count "$requests" \
  --isl "$isl" --isl-stddev 0 --osl "$osl" --osl-stddev 0 --extra-inputs ignore_eos:true \
  --artifact-dir "$out" --ui-type none
echo "aiperf artifacts: $out"
