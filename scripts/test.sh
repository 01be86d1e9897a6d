#!/usr/bin/env bash
# The one test command (README "Tests"; .ci/run calls it): formatting, lints, all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The CUDA backend builds without CUDA (dynamic loading), so CI lints it too (which type-checks
# its tests); the GPU tests themselves run on the device through scripts/gpu-tests.sh.
cargo clippy --workspace --all-targets --features cuda --quiet -- -D warnings
cargo test --workspace
