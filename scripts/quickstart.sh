#!/usr/bin/env bash
# The main job on a tiny model the repository carries (tests/fixtures/llama-gqa), on the CPU:
# inspect the model, compile the example LoRA config into a plan, score a text, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
Q=./target/release/qplc
set -x
$Q inspect tests/fixtures/llama-gqa
$Q compile examples/tiny-lora.toml --out target/plans/tiny-lora
$Q score --model tests/fixtures/llama-gqa --text tests/fixtures/text.txt --seq-len 32
$Q generate --model tests/fixtures/llama-gqa --prompt "To be, or not to be" --raw --max-new-tokens 8
rm -rf target/runs/tiny-lora
$Q run examples/tiny-lora.toml
RUN=$(ls -d target/runs/tiny-lora/*/ | tail -1)
$Q score --model tests/fixtures/llama-gqa --adapter "$RUN/epoch1" --text examples/data/tiny.txt --seq-len 64
$Q score --model tests/fixtures/llama-gqa --text examples/data/tiny.txt --seq-len 64
