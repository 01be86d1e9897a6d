#!/usr/bin/env python3
"""PyTorch + PEFT baseline for the CPU LoRA training-step benchmark (BENCHMARKS.md).

    python scripts/bench_cpu_lora.py MODEL_DIR TEXTFILE [--seq-len 512] [--rank 16] [--steps 6] [--threads 2]

Same work as one qplc step with gradient_accumulation_steps = 1: one sequence of --seq-len
tokens, forward + causal-LM loss + backward through LoRA adapters (rank --rank, alpha = rank,
all linear layers except lm_head, float32) + Adam update. Prints the median step time of the
steps after the first (warm-up) as JSON.
"""
import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("textfile")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(
        model,
        LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    model.train()
    ids = tok(open(a.textfile, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.99), eps=1e-6)
    times = []
    for s in range(a.steps):
        x = torch.tensor([ids[s * a.seq_len : (s + 1) * a.seq_len]])
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    print(json.dumps({
        "torch": torch.__version__,
        "threads": a.threads,
        "seq_len": a.seq_len,
        "rank": a.rank,
        "step_seconds_median": statistics.median(times[1:]),
        "step_seconds": times,
        "last_loss": float(loss),
    }))


if __name__ == "__main__":
    main()
