#!/usr/bin/env bash
# The one test command (README "Tests"; .ci/run calls it): formatting, lints, all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The CUDA backend builds without CUDA (dynamic loading), so CI lints it too; its tests skip
# (saying so) where no GPU is found — the GPU run is scripts/gpu-tests.sh on the device.
cargo clippy --workspace --all-targets --features cuda --quiet -- -D warnings
cargo test --workspace
cargo test -p qplc-runtime --features cuda --test cuda_backend
