#!/usr/bin/env python3
"""Reference losses for tests/train_parity.rs (issue 3 acceptance): LoRA training of the tiny
model (tests/fixtures/llama-gqa) in PyTorch + PEFT, with the same initial adapters, the same data
and the same optimiser maths as `qplc run` (spec §6.1, §7, §8).

What is shared with qplc, and how:
* data: the packed train sequences are read from the data cache (`.qpld`, layout in
  runtime/src/data/cache.rs) that `qplc run` builds for the config below, so tokenisation and
  packing are taken as given (they have their own tests); the losses are computed here only;
* initial adapters: runtime/src/adapter_init.rs re-implemented (PCG32 XSH-RR seeded with
  INIT_SEED = 42 and the FNV-1a hash of the weight name, A ~ U(-1/sqrt(in), 1/sqrt(in)) in f32,
  B = 0);
* the loop (spec §8.5), one sequence per step (GAS 1): HF causal-LM loss, backward, global-norm
  clip to 1.0 (scale 1/(norm + 1e-6) only when norm > 1), Adam as optimi computes it (§8.1:
  debiased betas, eps after the square root, no weight decay) with lr·f(k-1) at step k, then the
  composite LoRA decay (§6.1.4) with eta = lr·f(k) from the pre-decay A, B, where
  f(s) = sqrt((1 - beta2^s)/(1 + beta2^s)) (§8.3).

Usage (from the repository root, after `cargo build --bin qplc`):
    python scripts/make_train_parity.py [--qplc target/debug/qplc] [--steps 20]
writes tests/fixtures/train_parity.json. The config text must stay the one tests/train_parity.rs
builds (`config_text` below and `config` there apply the same edits to examples/tiny-lora.toml).
"""
import argparse
import glob
import json
import math
import os
import struct
import subprocess
import tempfile

import numpy as np
import peft
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INIT_SEED = 42
M64 = (1 << 64) - 1

# The settings tests/train_parity.rs overrides in examples/tiny-lora.toml.
OVERRIDES = {
    "gradient_accumulation_steps = 2": "gradient_accumulation_steps = 1",
    "evals_per_epoch = 4": "evals_per_epoch = 1",
}


def config_text(out_dir):
    ex = os.path.join(ROOT, "examples")
    text = open(os.path.join(ex, "tiny-lora.toml")).read()
    text = text.replace(
        'model_dir = "../tests/fixtures/llama-gqa"',
        'model_dir = "%s"' % os.path.join(ex, "../tests/fixtures/llama-gqa"),
    )
    text = text.replace('output_dir = "../target/runs/tiny-lora"', 'output_dir = "%s"' % out_dir)
    text = text.replace(
        'dataset_path = "data/tiny.txt"',
        'dataset_path = "%s"' % os.path.join(ex, "data/tiny.txt"),
    )
    for a, b in OVERRIDES.items():
        assert a in text, a
        text = text.replace(a, b)
    return text


def read_cache(path):
    """(input_ids, labels) of the train split, each [n_train, T], in training order."""
    raw = open(path, "rb").read()
    assert raw[:8] == b"QPLCDATA"
    version, hlen = struct.unpack("<II", raw[8:16])
    assert version == 1, version
    h = json.loads(raw[16 : 16 + hlen])
    t, n = h["seq_len"], h["n_train"] + h["n_eval"]
    ids = np.frombuffer(raw, dtype="<u4", count=n * t, offset=h["ids_offset"]).reshape(n, t)
    labels = np.frombuffer(raw, dtype="<i4", count=n * t, offset=h["labels_offset"]).reshape(n, t)
    return ids[: h["n_train"]].astype(np.int64), labels[: h["n_train"]].astype(np.int64)


class Pcg32:
    MUL = 6364136223846793005

    def __init__(self, seed, stream):
        self.state = 0
        self.inc = ((stream << 1) | 1) & M64
        self.next_u32()
        self.state = (self.state + seed) & M64
        self.next_u32()

    def next_u32(self):
        old = self.state
        self.state = (old * self.MUL + self.inc) & M64
        x = (((old >> 18) ^ old) >> 27) & 0xFFFFFFFF
        rot = old >> 59
        return ((x >> rot) | (x << ((32 - rot) & 31))) & 0xFFFFFFFF


def fnv1a(name):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def init_lora_a(name, rank, in_features):
    """adapter_init.rs, in the same f32 operations."""
    bound = np.float32(1.0) / np.sqrt(np.float32(in_features))
    rng = Pcg32(INIT_SEED, fnv1a(name))
    u = np.array([rng.next_u32() >> 8 for _ in range(rank * in_features)], dtype=np.float32)
    x = u * np.float32(1.0 / (1 << 24))
    v = -bound + (bound - -bound) * x  # all f32
    assert v.dtype == np.float32
    return torch.from_numpy(v.reshape(rank, in_features).copy())


def debiased_beta(beta, k):
    bk = beta**k
    return (bk - beta) / (bk - 1.0)


def rms_ratio(s, beta2):
    b = beta2**s
    return math.sqrt((1.0 - b) / (1.0 + b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qplc", default=os.path.join(ROOT, "target/debug/qplc"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/train_parity.json"))
    args = ap.parse_args()
    torch.manual_seed(0)

    # Settings of examples/tiny-lora.toml (spec §3 defaults for the Adam betas and eps).
    rank, alpha, lr, lam = 8, 8, 2e-3, 10.0
    beta1, beta2, eps = 0.9, 0.99, 1e-6

    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "cfg.toml")
        open(cfg, "w").write(config_text(os.path.join(tmp, "out")))
        subprocess.run([args.qplc, "run", cfg], check=True, capture_output=True)
        (cache,) = glob.glob(os.path.join(tmp, "out", "*", "data", "*.qpld"))
        ids, labels = read_cache(cache)
    assert len(ids) >= args.steps, (len(ids), args.steps)

    model_dir = os.path.join(ROOT, "tests/fixtures/llama-gqa")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lcfg = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", bias="none"
    )
    model = peft.get_peft_model(base, lcfg)
    model.eval()  # dropout is 0 anyway; eval() keeps any other train-mode path off

    # (qplc name, A param, B param) for every adapted linear, sorted by qplc name.
    pairs = []
    params = dict(model.named_parameters())
    for pname, p in params.items():
        if ".lora_A.default.weight" not in pname:
            continue
        qname = pname.removeprefix("base_model.model.").replace(".lora_A.default.", ".lora_A.")
        b = params[pname.replace(".lora_A.", ".lora_B.")]
        with torch.no_grad():
            p.copy_(init_lora_a(qname, p.shape[0], p.shape[1]))
            b.zero_()
        pairs.append((qname, p, b))
    pairs.sort(key=lambda x: x[0])
    assert len(pairs) == 14, len(pairs)
    trainable = [t for _, a, b in pairs for t in (a, b)]
    state = [(torch.zeros_like(t), torch.zeros_like(t)) for t in trainable]

    losses = []
    for k in range(1, args.steps + 1):
        x = torch.from_numpy(ids[k - 1]).unsqueeze(0)
        y = torch.from_numpy(labels[k - 1]).unsqueeze(0)
        for t in trainable:
            t.grad = None
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            grads = [t.grad for t in trainable]
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
            if norm > 1.0:
                for g in grads:
                    g.mul_(1.0 / (norm + 1e-6))
            # Adam (optimi's op order), lr·f(k−1).
            lr_k = lr * rms_ratio(k - 1, beta2)
            b1, b2 = debiased_beta(beta1, k), debiased_beta(beta2, k)
            for t, g, (m, v) in zip(trainable, grads, state):
                m.lerp_(g, 1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                t.addcdiv_(m, v.sqrt().add_(eps), value=-lr_k)
            # Composite LoRA decay with η = lr·f(k), from the pre-decay A, B, in f64.
            step = lr * rms_ratio(k, beta2) * lam
            for _, a, b in pairs:
                a64, b64 = a.double(), b.double()
                w = b64 @ a64
                a.copy_((a64 - step * (b64.T @ w)).float())
                b.copy_((b64 - step * (w @ a64.T)).float())
        print(f"step {k}: loss {losses[-1]:.8f}")

    out = {
        "about": "per-step train loss of LoRA r=8 all-linear on tests/fixtures/llama-gqa "
        "(examples/tiny-lora.toml with GAS 1), from scripts/make_train_parity.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "overrides": OVERRIDES,
        "losses": losses,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
