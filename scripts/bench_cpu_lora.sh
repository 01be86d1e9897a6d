#!/usr/bin/env bash
# CPU LoRA training step, SmolLM2-135M at sequence 512, rank 16 all-linear: qplc vs PyTorch + PEFT
# on the same machine and thread count (BENCHMARKS.md). Needs scripts/check_smollm2.sh's model.
#
# RUNS=n (default 1) alternates the two sides n times, so that load from other processes hits
# both alike; each qplc run reports the median step time of its steps 3–8 (1 / throughput of
# the step lines), each PyTorch run the median of its steps 2–6; the last line gives the best of
# each side and their ratio. QPLC_PROFILE=1 adds qplc's per-op time table of every step.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${QPLC_CACHE:-$HOME/.cache/qplc}
THREADS=${THREADS:-$(nproc)}
RUNS=${RUNS:-1}
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
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
# Like for like with the PyTorch side, which does not checkpoint (qplc's default is "layer").
activation_checkpointing = "none"
[[datasets]]
dataset_path = "$work/data.txt"
TOML
median() { sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
best_q=; best_t=
for run in $(seq "$RUNS"); do
  echo "== run $run/$RUNS, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "-- qplc ($THREADS threads)"
  rm -rf "$work/out"
  # The run stops at its first write after the 8th step line (SIGPIPE once grep has exited).
  (RAYON_NUM_THREADS=$THREADS timeout 1800 ./target/release/qplc run "$work/bench.toml" 2>&1 || true) \
    | grep -m 8 -E "step: [0-9]+ /" > "$work/qplc.log" || true
  sed 's/^.*step:/step:/' "$work/qplc.log"
  q=$(tail -n +3 "$work/qplc.log" \
      | sed -E 's/.*throughput: ([0-9.]+) sequences.*/\1/' | awk '{print 1/$1}' | median)
  echo "qplc step seconds (median of steps 3-8): $q"
  echo "-- PyTorch + PEFT ($THREADS threads)"
  out=$(python3 scripts/bench_cpu_lora.py "$CACHE/smollm2-hf" "$CACHE/hamlet.txt" --threads "$THREADS")
  echo "$out"
  t=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["step_seconds_median"])')
  best_q=$(printf '%s\n' $best_q $q | sort -g | head -1)
  best_t=$(printf '%s\n' $best_t $t | sort -g | head -1)
done
echo "best of $RUNS: qplc $best_q s, PyTorch + PEFT $best_t s, ratio $(awk -v a="$best_q" -v b="$best_t" 'BEGIN {printf "%.2f", a/b}')x, load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
