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
