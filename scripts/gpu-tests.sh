#!/usr/bin/env bash
# CUDA backend checks on the GPU machine (issue 6): every op on fresh random inputs and the
# tiny model's forward pass and LoRA training step, GPU against the CPU reference, printed
# as a table (`qplc cuda-check`).
#
# The GPU machine has no Rust toolchain, so the binary is built on a development machine:
#   cargo build --release --features cuda && strip -o .gpu/qplc target/release/qplc
#   cp scripts/gpu-tests.sh .gpu/ && cp -r tests/fixtures/llama-gqa .gpu/
# and this script runs from that folder (QPLC_BIN / QPLC_MODEL override the paths). Without
# a GPU it says so and exits 0 (nothing to check), so CI machines can call it harmlessly.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
bin=${QPLC_BIN:-}
if [ -z "$bin" ]; then
    for c in "$here/qplc" "$root/target/release/qplc"; do
        if [ -x "$c" ]; then bin=$c; break; fi
    done
fi
model=${QPLC_MODEL:-}
if [ -z "$model" ]; then
    for c in "$here/llama-gqa" "$root/tests/fixtures/llama-gqa"; do
        if [ -d "$c" ]; then model=$c; break; fi
    done
fi
out=${OUT:-$(mktemp -d)}
export NCCL_NVLS_ENABLE=0

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-tests: no NVIDIA GPU here; nothing to check"
    exit 0
fi
if [ -z "$bin" ] || [ -z "$model" ]; then
    echo "gpu-tests: need a qplc binary built with --features cuda and the llama-gqa fixture (see the header)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# cudarc loads libcuda, libnvrtc and libcublas by name at run time: put the folders that
# hold them (driver mount, CUDA toolkit, or the pip nvidia-* wheels) on the search path.
libdirs=""
for lib in libcuda.so.1 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13; do
    f=$(find /usr/local/nvidia /usr/local/cuda /usr/local/cuda-13.0 /usr/lib/x86_64-linux-gnu \
        /usr/local/lib /opt /usr/lib/python3 -name "$lib" 2>/dev/null | head -1)
    if [ -n "$f" ]; then
        libdirs="$libdirs:$(dirname "$f")"
    else
        echo "gpu-tests: $lib not found" >&2
    fi
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

"$bin" cuda-check --model "$model" "$@" 2>&1 | tee "$out/cuda-check.log"
rc=${PIPESTATUS[0]}

# The same perplexity through `qplc score` on both backends.
text=""
for c in "$here/text.txt" "$root/tests/fixtures/text.txt"; do
    if [ -f "$c" ]; then text=$c; break; fi
done
if [ -n "$text" ]; then
    for b in cpu cuda; do
        printf 'score --backend %-4s ' "$b"
        "$bin" score --model "$model" --text "$text" --seq-len 32 --backend "$b" | tr '\n' ' '
        echo
    done
fi

# A whole LoRA training run (tiny-lora.toml) on both backends, losses compared per step.
cfg=""
for c in "$here/tiny-lora.toml" "$root/examples/tiny-lora.toml"; do
    if [ -f "$c" ]; then cfg=$c; break; fi
done
if [ -n "$cfg" ]; then
    runs=()
    for b in cpu cuda; do
        derived="$(dirname "$cfg")/.gpu-tests-$b.toml"
        sed "s|^output_dir = .*|output_dir = \"$out/runs-$b\"|" "$cfg" > "$derived"
        rm -rf "$out/runs-$b"
        t0=$(date +%s.%N)
        if ! "$bin" run "$derived" --backend "$b" > "$out/run-$b.log" 2>&1; then
            echo "qplc run --backend $b failed:"; tail -20 "$out/run-$b.log"; rc=1
        fi
        t1=$(date +%s.%N)
        echo "qplc run --backend $b: $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}") s"
        rm -f "$derived"
        runs+=("$(ls -d "$out/runs-$b"/*/ 2>/dev/null | head -1)")
    done
    if [ -n "${runs[0]}" ] && [ -n "${runs[1]}" ]; then
        "$bin" cuda-check --compare-runs "${runs[0]}" "${runs[1]}" | tail -6 || rc=1
    fi
fi
exit "$rc"
