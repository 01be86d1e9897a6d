#!/usr/bin/env bash
# The one test command (README "Tests"; .ci/run calls it): formatting, lints, all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
