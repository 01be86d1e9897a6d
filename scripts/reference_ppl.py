#!/usr/bin/env python3
"""transformers reference for `qplc score` (perplexity) and `qplc generate` (greedy chat answer).

    python scripts/reference_ppl.py MODEL_DIR TEXTFILE --seq-len N [--max-tokens M] [--out FILE.json]
    python scripts/reference_ppl.py MODEL_DIR --generate PROMPT [--max-new-tokens 40]

Perplexity windowing rule (qplc score implements exactly the same):
1. read TEXTFILE as UTF-8 and tokenise the whole file with the model's tokenizer.json WITHOUT special
   tokens (no BOS/EOS added);
2. if --max-tokens M is given, keep only the first M tokens;
3. cut the ids into consecutive, non-overlapping windows of exactly N tokens,
   window k = ids[k*N : (k+1)*N] for k = 0 .. floor(len/N) - 1; the incomplete tail is dropped;
4. score every window independently (fresh context, positions 0..N-1, causal attention, no BOS
   prepended): the N-1 next-token predictions logits[t] -> ids[t+1], t = 0..N-2;
5. mean NLL = sum of all -log softmax(logits[t])[ids[t+1]] over all windows / (windows * (N-1)),
   every prediction weighted equally; perplexity = exp(mean NLL).
Reported: `tokens` (= windows * N, the tokens scored), `predictions`, `mean_nll`, `perplexity`,
per-window mean NLLs. The model runs in float32 with eager attention; log-softmax in float64.

Generation (--generate): the prompt becomes one user message rendered with the tokenizer's chat
template (add_generation_prompt=True, so the default system message of the template is included
when it has one); the rendered string is tokenised without adding special tokens; then greedy
decoding (argmax, no sampling, no repetition penalty) of up to --max-new-tokens tokens, stopping
early after the tokenizer's EOS token (which is included in `new_ids`). Prints prompt ids, new ids
and decoded text as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load(model_dir: str, attn: str, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).eval()
    return tok, model


def perplexity(tok, model, text: str, seq_len: int, max_tokens: int | None):
    import torch

    ids = tok(text, add_special_tokens=False)["input_ids"]
    total_in_file = len(ids)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise SystemExit(f"text has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    per_window = []
    total = 0.0
    for k in range(n_windows):
        w = torch.tensor([ids[k * seq_len : (k + 1) * seq_len]])
        with torch.no_grad():
            logits = model(w).logits[0].double()
        lp = torch.log_softmax(logits[:-1], dim=-1)
        nll = -lp.gather(1, w[0, 1:, None]).squeeze(1)
        total += float(nll.sum())
        per_window.append(float(nll.mean()))
    predictions = n_windows * (seq_len - 1)
    mean = total / predictions
    return {
        "tokens_in_file": total_in_file,
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "windows": n_windows,
        "tokens": n_windows * seq_len,
        "predictions": predictions,
        "mean_nll": mean,
        "perplexity": math.exp(mean),
        "window_mean_nll": per_window,
        "first_ids": ids[:16],
    }


def generate(tok, model, prompt: str, max_new_tokens: int):
    import torch

    rendered = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids])
    eos = tok.eos_token_id
    new_ids = []
    # Plain argmax loop over the full sequence (no KV-cache subtleties, no generation_config
    # defaults): exactly what `qplc generate` should reproduce.
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(ids).logits[0, -1].argmax())
            new_ids.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == eos:
                break
    return {
        "prompt": prompt,
        "rendered_prompt": rendered,
        "prompt_ids": prompt_ids,
        "new_ids": new_ids,
        "stopped_at_eos": bool(new_ids and new_ids[-1] == eos),
        "eos_token_id": eos,
        "text": tok.decode(new_ids, skip_special_tokens=True),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("textfile", nargs="?")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--generate", metavar="PROMPT")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--out", help="also write the JSON result to this file")
    args = ap.parse_args()
    if args.generate is None and (args.textfile is None or args.seq_len is None):
        ap.error("give TEXTFILE and --seq-len, or --generate PROMPT")

    import tokenizers
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    tok, model = load(args.model_dir, args.attn, args.dtype)
    result = {"model_dir": str(Path(args.model_dir)), "dtype": args.dtype, "attn_implementation": args.attn}
    if args.textfile is not None and args.seq_len is not None:
        text = Path(args.textfile).read_text(encoding="utf-8")
        result["textfile"] = str(args.textfile)
        result["score"] = perplexity(tok, model, text, args.seq_len, args.max_tokens)
    if args.generate is not None:
        result["generate"] = generate(tok, model, args.generate, args.max_new_tokens)
    result["versions"] = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
    }
    s = json.dumps(result, indent=2, ensure_ascii=False)
    print(s)
    if args.out:
        Path(args.out).write_text(s + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
