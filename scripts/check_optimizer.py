#!/usr/bin/env python3
"""Reference numbers for qplc's optimiser maths (runtime/src/train, spec §8, §6.1.4).

torch-optimi is not a dependency, so this re-implements `optimi.Adam`'s per-parameter step with the
same PyTorch in-place ops optimi uses (spec §8.1):

    m.lerp_(g, 1 - b1);  v.mul_(b2).addcmul_(g, g, value=1 - b2);  d = v.sqrt().add_(eps)
    float32:  p.addcdiv_(m, d, value=-lr)
    bf16/f16: c.addcdiv_(m, d, value=-lr); t = p.clone(); p.add_(c); c.add_(t.sub_(p))   (Kahan)

with debiased betas b(k) = (beta**k - beta) / (beta**k - 1), the RMS-ratio schedule
f(s) = sqrt((1 - beta2**s) / (1 + beta2**s)) with optimiser step k using lr * f(k - 1) (spec §8.3),
and global-norm clipping at 1.0 with scale 1 / (norm + 1e-6) (spec §8.2).

The toy problem is a diagonal quadratic, loss = 0.5 * sum(a * (p - t)**2), gradient a * (p - t)
evaluated in float32 from the current parameters and rounded once to the parameter dtype, so the
Rust test (runtime/tests/train_reference.rs) can recompute every gradient exactly and only the
optimiser maths is compared. The LoRA case applies the composite decay of spec §6.1.4 in float64
with W = B @ A formed explicitly.

Usage: python scripts/check_optimizer.py [--out tests/fixtures/optimizer_reference.json]
Deterministic (fixed seed, CPU).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def debias(beta: float, step: int) -> float:
    return (beta**step - beta) / (beta**step - 1)


def rms_ratio(s: int, beta2: float) -> float:
    b = beta2**s
    return math.sqrt((1 - b) / (1 + b))


def adam_step(p, g, m, v, c, *, lr, beta1, beta2, eps, step):
    """optimi's `_single_param_adam` without weight decay."""
    b1, b2 = debias(beta1, step), debias(beta2, step)
    m.lerp_(g, weight=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    d = v.sqrt().add_(eps)
    if c is None:
        p.addcdiv_(m, d, value=-lr)
    else:
        c.addcdiv_(m, d, value=-lr)
        t = p.detach().clone()
        p.add_(c)
        c.add_(t.sub_(p))


def clip_(g: torch.Tensor) -> float | None:
    norm = float(torch.linalg.vector_norm(g.double()))
    if norm > 1.0:
        g.mul_(1.0 / (norm + 1e-6))
        return norm
    return None


def as_list(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.float().tolist()]


def adam_case(name, dtype, *, n, steps, lr, beta1, beta2, eps, clip, gen):
    a = torch.linspace(0.5, 4.0, n, dtype=torch.float32)
    t = torch.randn(n, generator=gen, dtype=torch.float32)
    p = (torch.randn(n, generator=gen, dtype=torch.float32) * 2).to(DTYPES[dtype])
    p0 = p.clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    c = torch.zeros_like(p) if dtype != "f32" else None
    traj = []
    for k in range(1, steps + 1):
        g = (a * (p.float() - t)).to(p.dtype)
        norm = clip_(g) if clip else None
        adam_step(p, g, m, v, c, lr=lr * rms_ratio(k - 1, beta2), beta1=beta1, beta2=beta2, eps=eps, step=k)
        traj.append({
            "step": k,
            "clipped_norm": norm,
            "param": as_list(p),
            "exp_avg": as_list(m),
            "exp_avg_sq": as_list(v),
            "kahan_comp": None if c is None else as_list(c),
        })
    return {
        "name": name,
        "dtype": dtype,
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "eps": eps,
        "clip": clip,
        "a": as_list(a),
        "target": as_list(t),
        "param0": as_list(p0),
        "steps": traj,
    }


def lora_case(gen, *, rank, n_in, n_out, eta, lam):
    a = torch.randn(rank, n_in, generator=gen, dtype=torch.float32)
    b = torch.randn(n_out, rank, generator=gen, dtype=torch.float32) * 0.5
    a64, b64 = a.double(), b.double()
    w = b64 @ a64
    a_new = a64 - eta * lam * (b64.T @ w)
    b_new = b64 - eta * lam * (w @ a64.T)
    before = float(torch.linalg.matrix_norm(w))
    after = float(torch.linalg.matrix_norm(b_new @ a_new))
    return {
        "rank": rank,
        "in_features": n_in,
        "out_features": n_out,
        "eta": eta,
        "lambda": lam,
        "a": as_list(a.flatten()),
        "b": as_list(b.flatten()),
        "a_new": [float(x) for x in a_new.flatten().tolist()],
        "b_new": [float(x) for x in b_new.flatten().tolist()],
        "norm_before": before,
        "norm_after": after,
        "weight_decay": before - after,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/optimizer_reference.json")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(1234)
    hyper = dict(beta1=0.9, beta2=0.99, eps=1e-6)
    out = {
        "generator": "scripts/check_optimizer.py",
        "torch": torch.__version__,
        "schedule_beta2_0.99": {str(s): rms_ratio(s, 0.99) for s in (0, 1, 2, 5, 10, 50, 100, 200, 300, 500, 1000)},
        "adam": [
            adam_case("f32_clipped", "f32", n=16, steps=40, lr=0.05, clip=True, gen=gen, **hyper),
            adam_case("f32_unclipped", "f32", n=8, steps=25, lr=0.01, clip=False, gen=gen, **hyper),
            adam_case("bf16_kahan", "bf16", n=16, steps=40, lr=0.02, clip=True, gen=gen, **hyper),
            adam_case("f16_kahan", "f16", n=16, steps=40, lr=0.02, clip=True, gen=gen, **hyper),
        ],
        "lora_decay": lora_case(gen, rank=3, n_in=7, n_out=5, eta=0.05, lam=0.3),
    }
    # Compact (about 150 KB), as tests/fixtures has a 5 MB budget.
    Path(args.out).write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
