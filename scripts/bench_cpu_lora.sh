#!/usr/bin/env bash
# CPU LoRA training step, SmolLM2-135M at sequence 512, rank 16 all-linear: qplc vs PyTorch + PEFT
# on the same machine and thread count (BENCHMARKS.md). Needs scripts/check_smollm2.sh's model.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${QPLC_CACHE:-$HOME/.cache/qplc}
THREADS=${THREADS:-$(nproc)}
cargo build --release --quiet
work=$(mktemp -d)
head -c 400000 "$CACHE/hamlet.txt" > "$work/data.txt"
cat > "$work/bench.toml" <<TOML
model_dir = "$CACHE/smollm2-hf"
output_dir = "$work/out"
lora_rank = 16
lr = 1e-4
sequence_len = 512
gradient_accumulation_steps = 1
eval_fraction = 0.01
evals_per_epoch = 1
max_sequences = 140
[[datasets]]
dataset_path = "$work/data.txt"
TOML
echo "== qplc ($THREADS threads)"
RAYON_NUM_THREADS=$THREADS timeout 1800 ./target/release/qplc run "$work/bench.toml" 2>&1 \
  | grep -E "step: [0-9]+ /" | head -8 || true
echo "== PyTorch + PEFT ($THREADS threads)"
python3 scripts/bench_cpu_lora.py "$CACHE/smollm2-hf" "$CACHE/hamlet.txt" --threads "$THREADS"
rm -rf "$work"
