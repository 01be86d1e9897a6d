#!/usr/bin/env bash
# One device call: parity checks, then `qplc bench` and the PEFT baseline on the same card
# (BENCHMARKS.md "Training step on one GPU"). Run from a folder holding the stripped binary
# (`cargo build --release --features cuda && strip -o DIR/qplc target/release/qplc`), the
# llama-gqa fixture (`cp -r tests/fixtures/llama-gqa DIR/`), ../shared/bench/peft_baseline.py
# and this script: `cd DIR && ./bench-gpu.sh`. Results land in $OUT (or the current folder).
set -u
cd "$(dirname "$0")"
OUT=${OUT:-.}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
libdirs=""
for lib in libcuda.so.1 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13; do
    f=$(find /usr/local/nvidia /usr/local/cuda /usr/local/cuda-13.0 /usr/lib/x86_64-linux-gnu \
        /usr/local/lib /opt /usr/lib/python3 -name "$lib" 2>/dev/null | head -1)
    [ -n "$f" ] && libdirs="$libdirs:$(dirname "$f")"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
date -u
(timeout 120 ./qplc cuda-check --model llama-gqa > $OUT/check-full.txt 2>&1; tail -14 $OUT/check-full.txt; grep -iE "fail" $OUT/check-full.txt | head -20) | tee $OUT/check.txt
# --gc-auto: the selective (min-cut) policy; --gc: per-layer checkpointing (what PEFT's
# gradient_checkpointing does). The rows at the issue's targets first, then PEFT, then the rest.
bench() { timeout 100 ./qplc bench --shape $1 --mode $2 --seq 4096 $3 --steps 5 --warmup 2 2>&1 | tail -5 | tee -a $OUT/qplc.txt; }
bench llama-8b lora --gc-auto; bench llama-1b full --gc-auto; bench llama-1b lora --gc-auto
timeout 200 python3 peft_baseline.py llama-1b:lora:4096:gc llama-8b:lora:4096:gc llama-1b:full:4096:gc 2>&1 | grep -v Warning | tee $OUT/peft.txt
date -u
bench llama-8b lora --gc; bench llama-1b full --gc; bench llama-1b lora --gc
# Per-op times (a sync after each op) and the optimiser step.
QPLC_PROFILE=1 timeout 60 ./qplc bench --shape llama-1b --mode full --seq 4096 --gc-auto --steps 1 --warmup 1 > $OUT/prof-1bfull.txt 2>&1
QPLC_PROFILE=1 timeout 80 ./qplc bench --shape llama-8b --mode lora --seq 4096 --gc-auto --steps 1 --warmup 1 > $OUT/prof-8b.txt 2>&1
date -u
