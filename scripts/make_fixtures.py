#!/usr/bin/env python3
"""Golden fixtures for qplc's model builder and CPU backend (tests/fixtures/).

Deterministic (fixed seeds, CPU, float32, eager attention). For each tiny random model this writes
an HF folder tests/fixtures/<name>/ with

* config.json, model.safetensors (llama-tied: sharded model-0000k-of-0000n.safetensors +
  model.safetensors.index.json, so the sharded loader is exercised),
* tokenizer.json + tokenizer_config.json (one small byte-level BPE shared by all fixtures),
* expected.safetensors: `input_ids` i64 [T], `logits` f32 [T, V], `hidden` f32 [T, H] (output of
  the final norm), `hidden_states.{k}` f32 [T, H] for k = 0..L (HF `output_hidden_states`: k = 0
  is the embedding output, k = L the final-norm output),
* expected.json: token count, mean next-token NLL over the T-1 predictions, perplexity, versions.

Input: tests/fixtures/text.txt tokenised WITHOUT special tokens, first T = 32 ids, positions 0..T-1.

Weights use HF's default init with a large `initializer_range` (0.15) so logits are far from
uniform; RMSNorm weights and linear biases (zero/one by default in HF) are randomised too so that a
loader that ignored them would fail the comparison.

The script also checks every model against an independent manual forward (explicit causal /
sliding-window mask, explicit llama3 inverse frequencies as in ops::Rope::inv_freq) and checks the
HF Mistral sliding-window semantics; the findings are printed and written to
tests/fixtures/sliding_window_check.json.

Usage: python scripts/make_fixtures.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

T = 32
VOCAB = 512
INIT_RANGE = 0.15

# Public-domain English (Lincoln's Gettysburg Address, 1863): the fixture text.
FIXTURE_TEXT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. "
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that war. "
    "We have come to dedicate a portion of that field, as a final resting place for those who "
    "here gave their lives that that nation might live.\n"
)

# Public-domain English used only to train the tiny tokenizer (Austen 1813, Dickens 1859,
# Melville 1851, the US Declaration of Independence 1776, plus the fixture text).
TRAIN_TEXT = [
    FIXTURE_TEXT,
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the "
    "winter of despair, we had everything before us, we had nothing before us, we were all going "
    "direct to Heaven, we were all going direct the other way.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in "
    "my purse, and nothing particular to interest me on shore, I thought I would sail about a "
    "little and see the watery part of the world. It is a way I have of driving off the spleen "
    "and regulating the circulation.",
    "When in the Course of human events, it becomes necessary for one people to dissolve the "
    "political bands which have connected them with another, and to assume among the powers of "
    "the earth, the separate and equal station to which the Laws of Nature and of Nature's God "
    "entitle them, a decent respect to the opinions of mankind requires that they should declare "
    "the causes which impel them to the separation. We hold these truths to be self-evident, "
    "that all men are created equal, that they are endowed by their Creator with certain "
    "unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness.",
    "But, in a larger sense, we can not dedicate, we can not consecrate, we can not hallow this "
    "ground. The brave men, living and dead, who struggled here, have consecrated it, far above "
    "our poor power to add or detract. The world will little note, nor long remember what we say "
    "here, but it can never forget what they did here. 0123456789 (a, b) [c; d] {e: f} \"g\" 'h' "
    "x = y + z * 2 - 1 / 3 % 4 & | ! ? # @ $ ^ ~ ` < > _",
]


def build_tokenizer(out: Path):
    """A real byte-level BPE (GPT-2 style) with `<s>` = 0 and `</s>` = 1, vocab exactly VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT * 4, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert tok.token_to_id("<s>") == 0 and tok.token_to_id("</s>") == 1

    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=2048,
    )
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out))
    return hf_tok


def model_specs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        initializer_range=INIT_RANGE,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return [
        dict(
            name="llama-gqa",
            seed=1001,
            arch="LlamaForCausalLM",
            config=LlamaConfig(
                **common, tie_word_embeddings=False, rope_parameters=llama3_rope
            ),
            shard=None,
            legacy_rope_keys=True,
        ),
        dict(
            name="llama-tied",
            seed=1002,
            arch="LlamaForCausalLM",
            config=LlamaConfig(
                **common,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            shard="100KB",
        ),
        dict(
            name="mistral-swa",
            seed=1003,
            arch="MistralForCausalLM",
            config=MistralConfig(
                **common,
                tie_word_embeddings=False,
                sliding_window=8,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            shard=None,
        ),
        dict(
            name="qwen2-bias",
            seed=1004,
            arch="Qwen2ForCausalLM",
            config=Qwen2Config(
                **common,
                tie_word_embeddings=True,
                use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            shard=None,
        ),
    ]


def randomise_extras(model, seed: int):
    """HF initialises RMSNorm weights to 1 and linear biases to 0; perturb them so they matter."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def write_legacy_rope_keys(path: Path):
    """Rewrite transformers-5 `rope_parameters` as the transformers-4 / Hub form
    (top-level `rope_theta` + `rope_scaling`), which most published checkpoints still carry.
    The fixture is then reloaded from disk, so the expected logits prove transformers 5 reads
    the legacy form the same way (and the Rust config reader must accept both forms)."""
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- independent manual forward


def inv_freq_manual(cfg) -> torch.Tensor:
    """Same formulas as ops::Rope::inv_freq (f64)."""
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    base = [1.0 / theta ** ((2 * i) / d) for i in range(d // 2)]
    if rp.get("rope_type", "default") == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        lw, hw = old / lo, old / hi
        out = []
        for f in base:
            wl = 2 * math.pi / f
            if wl < hw:
                out.append(f)
            elif wl > lw:
                out.append(f / factor)
            else:
                s = (old / wl - lo) / (hi - lo)
                out.append((1 - s) * f / factor + s * f)
        base = out
    return torch.tensor(base, dtype=torch.float64)


def manual_forward(model, ids: torch.Tensor, window_rule: str | None) -> torch.Tensor:
    """Llama-family forward in float64 with an explicit mask.

    window_rule: None (plain causal), "lt" (j <= i and i - j < w), "le" (j <= i and i - j <= w).
    """
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    eps = cfg.rms_norm_eps
    t = ids.shape[0]

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def lin(x, prefix):
        y = x @ sd[prefix + ".weight"].T
        if prefix + ".bias" in sd:
            y = y + sd[prefix + ".bias"]
        return y

    inv = inv_freq_manual(cfg)
    pos = torch.arange(t, dtype=torch.float64)
    ang = pos[:, None] * inv[None, :]  # [T, d/2]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # x [T, h, d], rotate_half pairs (i, i + d/2)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    allowed = j <= i
    w = getattr(cfg, "sliding_window", None)
    if window_rule == "lt":
        allowed = allowed & (i - j < w)
    elif window_rule == "le":
        allowed = allowed & (i - j <= w)

    x = sd["model.embed_tokens.weight"][ids]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}"
        h = rms(x, sd[p + ".input_layernorm.weight"])
        q = rope(lin(h, p + ".self_attn.q_proj").view(t, nh, d))
        k = rope(lin(h, p + ".self_attn.k_proj").view(t, nkv, d))
        v = lin(h, p + ".self_attn.v_proj").view(t, nkv, d)
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        att = torch.einsum("hij,jhd->ihd", torch.softmax(scores, -1), v).reshape(t, nh * d)
        x = x + lin(att, p + ".self_attn.o_proj")
        h = rms(x, sd[p + ".post_attention_layernorm.weight"])
        g = lin(h, p + ".mlp.gate_proj")
        u = lin(h, p + ".mlp.up_proj")
        x = x + lin(F.silu(g) * u, p + ".mlp.down_proj")
    x = rms(x, sd["model.norm.weight"])
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return x @ head.T


def mean_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lp = torch.log_softmax(logits.double()[:-1], dim=-1)
    return float(-lp.gather(1, ids[1:, None]).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests/fixtures"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    import safetensors.torch
    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    classes = {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": MistralForCausalLM,
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
    }
    versions = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }

    (out / "text.txt").write_text(FIXTURE_TEXT)
    tok_dir = out / "_tokenizer"
    hf_tok = build_tokenizer(tok_dir)
    ids_list = hf_tok(FIXTURE_TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids_list) >= T, len(ids_list)
    ids = torch.tensor(ids_list[:T], dtype=torch.long)
    (out / "tokens.json").write_text(
        json.dumps({"text_file": "text.txt", "add_special_tokens": False, "all_ids": ids_list, "first_T": T}) + "\n"
    )

    summary = {}
    swa_report = {}
    for spec in model_specs():
        name, cfg = spec["name"], spec["config"]
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        torch.manual_seed(spec["seed"])
        cfg._attn_implementation = "eager"
        model = classes[spec["arch"]](cfg).float().eval()
        randomise_extras(model, spec["seed"])
        if spec["shard"]:
            model.save_pretrained(str(d), max_shard_size=spec["shard"])
        else:
            model.save_pretrained(str(d))
        for f in tok_dir.iterdir():
            shutil.copy(f, d / f.name)
        if spec.get("legacy_rope_keys"):
            write_legacy_rope_keys(d / "config.json")

        # Reload from disk (what the Rust side sees) and score with eager attention.
        m = AutoModelForCausalLM.from_pretrained(str(d), attn_implementation="eager", dtype=torch.float32).eval()
        with torch.no_grad():
            o = m(ids[None], output_hidden_states=True)
        logits = o.logits[0].float().contiguous()
        hs = [h[0].float().contiguous() for h in o.hidden_states]
        nll = mean_nll(logits, ids)

        # Independent check of the semantics the Rust side implements.
        swa = getattr(cfg, "sliding_window", None) if name.startswith("mistral") else None
        with torch.no_grad():
            ref = manual_forward(m, ids, "lt" if swa else None)
        max_diff = float((ref - logits.double()).abs().max())
        assert max_diff < 1e-4, (name, max_diff)
        entry = {"manual_forward_max_abs_diff": max_diff}
        rp = getattr(m.config, "rope_parameters", None) or {}
        if rp.get("rope_type") == "llama3":
            # The scaling must matter at T = 32, or the fixture would not test it.
            plain_cfg = {k: v for k, v in rp.items()}
            m.config.rope_parameters = {"rope_type": "default", "rope_theta": rp["rope_theta"]}
            with torch.no_grad():
                unscaled = manual_forward(m, ids, None)
            m.config.rope_parameters = plain_cfg
            entry["llama3_vs_unscaled_rope_max_abs_diff"] = float((unscaled - logits.double()).abs().max())
            entry["loaded_rope_parameters"] = dict(rp)
            assert entry["llama3_vs_unscaled_rope_max_abs_diff"] > 1e-2, entry
        if swa:
            with torch.no_grad():
                m_sdpa = AutoModelForCausalLM.from_pretrained(
                    str(d), attn_implementation="sdpa", dtype=torch.float32
                ).eval()
                sdpa_logits = m_sdpa(ids[None]).logits[0].double()
                le = manual_forward(m, ids, "le")
                plain = manual_forward(m, ids, None)
            entry.update(
                {
                    "sliding_window": swa,
                    "T": T,
                    "eager_vs_manual_j_le_i_and_i_minus_j_lt_w": max_diff,
                    "sdpa_vs_manual_j_le_i_and_i_minus_j_lt_w": float((ref - sdpa_logits).abs().max()),
                    "eager_vs_manual_i_minus_j_le_w": float((le - logits.double()).abs().max()),
                    "eager_vs_manual_plain_causal": float((plain - logits.double()).abs().max()),
                }
            )
            assert entry["sdpa_vs_manual_j_le_i_and_i_minus_j_lt_w"] < 1e-4, entry
            assert entry["eager_vs_manual_i_minus_j_le_w"] > 1e-3, entry
            swa_report = entry

        tensors = {"input_ids": ids.clone(), "logits": logits, "hidden": hs[-1].clone()}
        for k, h in enumerate(hs):
            tensors[f"hidden_states.{k}"] = h
        safetensors.torch.save_file(tensors, str(d / "expected.safetensors"), metadata={"T": str(T)})
        info = {
            "model": name,
            "architecture": spec["arch"],
            "seed": spec["seed"],
            "text_file": "../text.txt",
            "add_special_tokens": False,
            "token_count": T,
            "predictions": T - 1,
            "mean_nll": nll,
            "perplexity": math.exp(nll),
            "logits_std": float(logits.std()),
            "attn_implementation": "eager",
            "dtype": "float32",
            "checks": entry,
            "versions": versions,
        }
        (d / "expected.json").write_text(json.dumps(info, indent=2) + "\n")
        summary[name] = {"mean_nll": nll, "perplexity": math.exp(nll), "logits_std": info["logits_std"]}
        print(f"{name:12s} nll={nll:.6f} ppl={math.exp(nll):.4f} logits_std={info['logits_std']:.3f} "
              f"manual_diff={max_diff:.2e}")

    shutil.rmtree(tok_dir)
    (out / "sliding_window_check.json").write_text(json.dumps(swa_report, indent=2) + "\n")
    print("sliding window:", json.dumps(swa_report))
    (out / "summary.json").write_text(json.dumps({"versions": versions, "fixtures": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
