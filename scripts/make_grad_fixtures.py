#!/usr/bin/env python3
"""Reference gradients for qplc's autodiff (tests/fixtures/llama-gqa/grads.safetensors).

Loads the tiny `llama-gqa` fixture with transformers (eager attention), feeds the fixture's
32 input ids with `labels = input_ids` (transformers shifts them: position t predicts t+1,
mean over the 31 predictions — spec §7), and backpropagates the cross-entropy loss. The
reference is computed in float64 (so it carries no float32 rounding of its own) and stored as
float32:

* `<parameter name>` f32, same shape as the parameter: d loss / d parameter, for every
  parameter of the model (`lm_head.weight` included: the fixture is untied);
* `loss` f64 [1]: the loss value.

The float32 run is compared with the float64 one and the difference printed (a measure of
how much f32 rounding alone moves the gradients). Deterministic; ~2 s on a CPU.

Usage: python scripts/make_grad_fixtures.py [--fixture tests/fixtures/llama-gqa]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def grads(model_dir: Path, ids: torch.Tensor, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), attn_implementation="eager", dtype=torch.float32
    ).to(dtype)
    model.train(False)  # dropout off (its rates are 0 anyway)
    out = model(input_ids=ids[None], labels=ids[None])
    out.loss.backward()
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.loss.detach().item(), g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", default="tests/fixtures/llama-gqa")
    args = ap.parse_args()
    d = Path(args.fixture)
    torch.manual_seed(0)
    ids = load_file(str(d / "expected.safetensors"))["input_ids"].to(torch.long)

    loss64, g64 = grads(d, ids, torch.float64)
    loss32, g32 = grads(d, ids, torch.float32)
    expected = json.loads((d / "expected.json").read_text())["mean_nll"]
    print(f"loss f64 {loss64:.12f}  f32 {loss32:.9f}  expected.json mean_nll {expected:.12f}")
    assert abs(loss64 - expected) < 1e-5, "loss disagrees with the forward fixture"
    worst = 0.0
    for n in g64:
        scale = g64[n].abs().max().item()
        err = (g32[n].double() - g64[n]).abs().max().item() / max(scale, 1e-30)
        worst = max(worst, err)
    print(f"f32 vs f64 gradients: worst max|Δ|/max|g| over parameters = {worst:.3e}")

    tensors = {n: g.to(torch.float32).contiguous() for n, g in g64.items()}
    tensors["loss"] = torch.tensor([loss64], dtype=torch.float64)
    save_file(tensors, str(d / "grads.safetensors"))
    print(f"wrote {d / 'grads.safetensors'}: {len(g64)} parameter gradients")


if __name__ == "__main__":
    main()
