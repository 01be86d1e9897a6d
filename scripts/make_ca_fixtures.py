#!/usr/bin/env python3
"""Reference data for qplc's Control Adapters (spec §6.2, §11.3), from an independent PyTorch
implementation of the same forward on the tiny model tests/fixtures/llama-gqa.

The Control Adapter here is a forward hook on each HF `LlamaDecoderLayer` (input h, output o):
    o' = o + ((o − h) @ Q * lam_t) @ Q.T,   lam_t = expm1(S) if c_t = +1, expm1(−S) if −1, 0 if 0,
with c_t the class of token t+1 (last position 0): spec §6.2.3.

Writes:
* tests/fixtures/ca_grads.safetensors — gradient parity (tests/control_gradients.rs): the fixture's
  32 input ids, a mixed +1/−1/0 class vector, random orthonormal Q [64, 4] and random S [4] for
  both layers, and (computed in float64, stored as float32) the logits, the loss (f64) and
  d loss / d Q, d loss / d S;
* tests/fixtures/ca_adapter/ — that adapter as qplc writes one (adapter_model.safetensors with
  `base_model.model.model.layers.<i>.control_{Q,S}` + adapter_config.json);
* tests/fixtures/ca_fidelity.json — the export fidelity (tests/control_export.rs): with
  B = Q diag(expm1(±S)), A = Q.T @ W_down on mlp.down_proj, the mean over predicted tokens of
  KL(p_CA || p_LoRA) and KL(p_CA || p_base) on [BOS] + tokens(tests/fixtures/text.txt) (first
  128 tokens), forward and --inverse;
* tests/fixtures/ca_train_parity.json — 20-step training parity (tests/control_train_parity.rs):
  examples/control-adapter.toml with GAS 1, the packed sequences read from the data cache that
  `qplc run` builds (as scripts/make_train_parity.py does), Q initialised as qplc does (PCG32
  stream per weight name → Box–Muller normals → modified Gram–Schmidt twice, f64 → f32), then
  per step: HF loss, backward, clip 1.0, Adam (optimi order) with lr·f(k−1), Newton retraction
  Q ← Q − γQ(QᵀQ − I) and S ← (1 − ηw)S with η = lr·f(k), both in f64 rounded to f32.

Usage (repository root, after `cargo build --bin qplc`):
    python scripts/make_ca_fixtures.py [--qplc target/debug/qplc] [--skip-train]
"""
import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_train_parity import Pcg32, debiased_beta, fnv1a, rms_ratio  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests/fixtures/llama-gqa")
FIX = os.path.join(ROOT, "tests/fixtures")
INIT_SEED = 42
RANK = 4
FIDELITY_TOKENS = 128
CLASSES = [0] + [1] * 9 + [-1] * 9 + [0] * 3 + [1, 1, -1, 1, -1, -1, 0, 1, 1, -1]
TRAIN_OVERRIDES = {
    "gradient_accumulation_steps = 2": "gradient_accumulation_steps = 1",
    "evals_per_epoch = 4": "evals_per_epoch = 1",
}


def load_model(dtype):
    m = transformers.AutoModelForCausalLM.from_pretrained(
        MODEL, attn_implementation="eager", dtype=torch.float32
    ).to(dtype)
    m.train(False)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class ControlAdapters:
    """Forward hooks implementing spec §6.2.3 on every layer in `params` ({layer: (Q, S)})."""

    def __init__(self, model, params, classes):
        self.params = params
        self.set_classes(classes)
        self.handles = [
            model.model.layers[i].register_forward_hook(self.hook(i), with_kwargs=True)
            for i in params
        ]

    def set_classes(self, classes):
        c = torch.as_tensor(classes, dtype=torch.long)
        self.eff = torch.cat([c[1:], torch.zeros(1, dtype=torch.long)])  # shift left, pad 0

    def hook(self, i):
        def f(module, args, kwargs, out):
            h = args[0] if args else kwargs["hidden_states"]
            q, s = self.params[i]
            delta = (out - h).to(q.dtype)
            lam_p, lam_n = torch.expm1(s), torch.expm1(-s)
            pos = (self.eff == 1).to(q.dtype)[:, None]
            neg = (self.eff == -1).to(q.dtype)[:, None]
            lam = pos * lam_p + neg * lam_n  # [T, r]
            a = ((delta @ q) * lam) @ q.T
            return out + a.to(out.dtype)

        return f

    def remove(self):
        for h in self.handles:
            h.remove()


def random_adapter(gen, h, r, dtype=torch.float64):
    g = torch.randn(h, r, generator=gen, dtype=torch.float64)
    q, rr = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(rr))[None, :]
    s = 0.3 * torch.randn(r, generator=gen, dtype=torch.float64)
    # The fixture stores float32; the reference uses exactly those values.
    return q.float().to(dtype), s.float().to(dtype)


def grads_fixture():
    ids = load_file(os.path.join(MODEL, "expected.safetensors"))["input_ids"].to(torch.long)
    assert len(ids) == len(CLASSES) == 32
    gen = torch.Generator().manual_seed(1234)
    raw = {i: random_adapter(gen, 64, RANK) for i in range(2)}
    out = {"input_ids": ids.to(torch.int32), "classes": torch.tensor(CLASSES, dtype=torch.int32)}
    res = {}
    for dtype in (torch.float64, torch.float32):
        model = load_model(dtype)
        params = {
            i: (q.to(dtype).clone().requires_grad_(True), s.to(dtype).clone().requires_grad_(True))
            for i, (q, s) in raw.items()
        }
        ca = ControlAdapters(model, params, CLASSES)
        r = model(input_ids=ids[None], labels=ids[None])
        r.loss.backward()
        res[dtype] = (r.loss.item(), r.logits[0].detach(), {i: (q.grad, s.grad) for i, (q, s) in params.items()})
        ca.remove()
    loss, logits, g = res[torch.float64]
    loss32, _, g32 = res[torch.float32]
    print(f"loss f64 {loss:.10f}  f32 {loss32:.10f}")
    for i in raw:
        for k, (a, b) in enumerate(zip(g[i], g32[i])):
            rel = float((a.float() - b).abs().max() / a.abs().max())
            print(f"layer {i} {'QS'[k]}: |grad| max {float(a.abs().max()):.3e}, f32 vs f64 rel {rel:.2e}")
    for i, (q, s) in raw.items():
        out[f"model.layers.{i}.control_Q"] = q.float()
        out[f"model.layers.{i}.control_S"] = s.float()
        out[f"grad:model.layers.{i}.control_Q"] = g[i][0].float()
        out[f"grad:model.layers.{i}.control_S"] = g[i][1].float()
    out["logits"] = logits.float()
    out["loss"] = torch.tensor([loss], dtype=torch.float64)
    # The model output with S = 0 for every class equals the base model (check 25).
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(FIX, "ca_grads.safetensors"))

    d = os.path.join(FIX, "ca_adapter")
    os.makedirs(d, exist_ok=True)
    save_file(
        {f"base_model.model.model.layers.{i}.control_{n}": t.float().contiguous()
         for i, (q, s) in raw.items() for n, t in (("Q", q), ("S", s))},
        os.path.join(d, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    cfg = {
        "base_model_name_or_path": "tests/fixtures/llama-gqa", "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "layers_to_transform": None, "lora_alpha": RANK, "lora_dropout": 0.0,
        "peft_type": "LORA", "r": RANK, "target_modules": [], "task_type": "CAUSAL_LM", "use_rslora": False,
    }
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return raw


def kl_mean(p_logits, q_logits, rows):
    lp = torch.log_softmax(p_logits[:rows].double(), -1)
    lq = torch.log_softmax(q_logits[:rows].double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def fidelity_fixture(raw):
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    text = open(os.path.join(FIX, "text.txt"), encoding="utf-8").read()
    bos = json.load(open(os.path.join(MODEL, "config.json")))["bos_token_id"]
    ids = ([bos] + tok.encode(text, add_special_tokens=False).ids)[:FIDELITY_TOKENS]
    t = len(ids)
    x = torch.tensor(ids)[None]
    model = load_model(torch.float32)
    with torch.no_grad():
        base = model(input_ids=x).logits[0]
    result = {"tokens": t, "about": "mean KL per predicted token (positions 0..T-2), nats; "
              "from scripts/make_ca_fixtures.py"}
    for inverse in (False, True):
        cls = -1 if inverse else 1
        params = {i: (q.float(), s.float()) for i, (q, s) in raw.items()}
        ca = ControlAdapters(model, params, [cls] * t)
        with torch.no_grad():
            ca_logits = model(input_ids=x).logits[0]
        ca.remove()
        # The exported LoRA on down_proj, as a PEFT branch: y + (x @ A.T) @ B.T with
        # B = Q diag(λ), A = Qᵀ W computed in f64 and stored in f32 (what the export writes).
        handles = []
        for i, (q, s) in raw.items():
            lin = model.model.layers[i].mlp.down_proj
            q64 = q.double()
            lam = torch.expm1(-s.double() if inverse else s.double())
            b = (q64 * lam[None, :]).float()
            a = (q64.T @ lin.weight.double()).float()
            handles.append(lin.register_forward_hook(
                lambda mod, inp, out, a=a, b=b: out + (inp[0] @ a.T) @ b.T))
        with torch.no_grad():
            lora_logits = model(input_ids=x).logits[0]
        for hd in handles:
            hd.remove()
        key = "inverse" if inverse else "forward"
        result[key] = {
            "kl_lora": kl_mean(ca_logits, lora_logits, t - 1),
            "kl_base": kl_mean(ca_logits, base, t - 1),
        }
        print(key, result[key])
    with open(os.path.join(FIX, "ca_fidelity.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


# ---- 20-step training parity ----


def normal(rng):
    u1 = ((rng.next_u32() >> 8) + 1.0) / float(1 << 24)
    u2 = (rng.next_u32() >> 8) / float(1 << 24)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def init_q(name, h, r):
    """runtime/src/train/control_reg.rs::init_control_q."""
    rng = Pcg32(INIT_SEED, fnv1a(name))
    q = np.array([normal(rng) for _ in range(h * r)], dtype=np.float64).reshape(h, r)
    for j in range(r):
        for _ in range(2):
            for k in range(j):
                q[:, j] -= (q[:, k] @ q[:, j]) * q[:, k]
        q[:, j] /= math.sqrt(q[:, j] @ q[:, j])
    return torch.from_numpy(q.astype(np.float32))


def config_text(out_dir):
    ex = os.path.join(ROOT, "examples")
    text = open(os.path.join(ex, "control-adapter.toml")).read()
    text = text.replace(
        'model_dir = "../tests/fixtures/llama-gqa"',
        'model_dir = "%s"' % os.path.join(ex, "../tests/fixtures/llama-gqa"),
    )
    text = text.replace('output_dir = "../target/runs/control-adapter"', 'output_dir = "%s"' % out_dir)
    for n in ("ca-positive", "ca-negative", "ca-neutral"):
        text = text.replace('"data/%s.jsonl"' % n, '"%s"' % os.path.join(ex, "data/%s.jsonl" % n))
    for a, b in TRAIN_OVERRIDES.items():
        assert a in text, a
        text = text.replace(a, b)
    return text


def read_cache(path):
    import struct

    raw = open(path, "rb").read()
    assert raw[:8] == b"QPLCDATA"
    version, hlen = struct.unpack("<II", raw[8:16])
    h = json.loads(raw[16 : 16 + hlen])
    t, n, nt = h["seq_len"], h["n_train"] + h["n_eval"], h["n_train"]
    ids = np.frombuffer(raw, dtype="<u4", count=n * t, offset=h["ids_offset"]).reshape(n, t)
    labels = np.frombuffer(raw, dtype="<i4", count=n * t, offset=h["labels_offset"]).reshape(n, t)
    classes = np.frombuffer(raw, dtype="<i1", count=n * t, offset=h["classes_offset"]).reshape(n, t)
    return ids[:nt].astype(np.int64), labels[:nt].astype(np.int64), classes[:nt].astype(np.int64)


def train_fixture(qplc, steps):
    rank, lr, wd, gamma = 8, 2e-3, 100.0, 0.5
    beta1, beta2, eps = 0.9, 0.99, 1e-6
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "cfg.toml")
        open(cfg, "w").write(config_text(os.path.join(tmp, "out")))
        subprocess.run([qplc, "run", cfg], check=True, capture_output=True)
        (cache,) = glob.glob(os.path.join(tmp, "out", "*", "data", "*.qpld"))
        ids, labels, classes = read_cache(cache)
    assert len(ids) >= steps, (len(ids), steps)
    mix = {int(v): int((classes[:steps] == v).sum()) for v in (-1, 0, 1)}
    print("class counts over the compared steps:", mix)
    assert mix[1] > 0 and mix[-1] > 0

    model = load_model(torch.float32)
    h = model.config.hidden_size
    params = {}
    for i in range(model.config.num_hidden_layers):
        q = init_q(f"model.layers.{i}.control_Q", h, rank).requires_grad_(True)
        s = torch.zeros(rank, requires_grad=True)
        params[i] = (q, s)
    ca = ControlAdapters(model, params, [0] * ids.shape[1])
    trainable = [t for i in sorted(params) for t in params[i]]
    state = [(torch.zeros_like(t), torch.zeros_like(t)) for t in trainable]
    losses = []
    for k in range(1, steps + 1):
        ca.set_classes(classes[k - 1])
        x = torch.from_numpy(ids[k - 1])[None]
        y = torch.from_numpy(labels[k - 1])[None]
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
            lr_k = lr * rms_ratio(k - 1, beta2)
            b1, b2 = debiased_beta(beta1, k), debiased_beta(beta2, k)
            for t, g, (m, v) in zip(trainable, grads, state):
                m.lerp_(g, 1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                t.addcdiv_(m, v.sqrt().add_(eps), value=-lr_k)
            eta = lr * rms_ratio(k, beta2)
            for i in sorted(params):
                q, s = params[i]
                q64 = q.double()
                e = q64.T @ q64 - torch.eye(rank, dtype=torch.float64)
                q.copy_((q64 - gamma * (q64 @ e)).float())
                s.copy_(((1.0 - eta * wd) * s.double()).float())
        print(f"step {k}: loss {losses[-1]:.8f}")
    ca.remove()
    out = {
        "about": "per-step train loss of Control Adapters r=8 on both layers of tests/fixtures/llama-gqa "
        "(examples/control-adapter.toml with GAS 1), from scripts/make_ca_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "overrides": TRAIN_OVERRIDES,
        "class_counts": {str(k): v for k, v in mix.items()},
        "losses": losses,
    }
    with open(os.path.join(FIX, "ca_train_parity.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qplc", default=os.path.join(ROOT, "target/debug/qplc"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    raw = grads_fixture()
    fidelity_fixture(raw)
    if not args.skip_train:
        train_fixture(args.qplc, args.steps)


if __name__ == "__main__":
    main()
