"""Cross-tokenizer benchmark (issue #23): how much of same-tokenizer distillation's gain a student
of another tokenizer recovers, from the same teacher store.

One teacher (8192-id tokenizer), one sampled store over its tokenization of the training text, and
two same-shape students: one with the teacher's tokenizer, one with ``data/tokenizer-4096`` (a
second BPE trained by ``distill tokenizer --vocab-size 4096`` on the same corpus; its embedding is
half as large). Every run reads the same store rows — the same bytes — for the same steps:

- ``same-ce`` / ``same-kd``: the teacher's tokenizer, α = 1 / α = 0.5 (today's path);
- ``cross-ce``: the other tokenizer, α = 1 (its own tokenization of the store's rows, CE only);
- ``cross-exact`` / ``cross-chunk`` / ``cross-both``: the other tokenizer, α = 0.5, each
  ``--cross-tokenizer`` mode with today's defaults (``--unmapped first --cross-positions starts
  --cross-uncovered teacher``); ``-bucket`` after one (``cross-exact-bucket``) runs the next-token
  term as it was first measured (``--unmapped bucket --cross-positions 1to1 --cross-uncovered none``:
  what ``bench/results/cross_tokenizer_cpu.json``'s plain ``cross-*`` modes ran), ``-prefix`` adds
  ``--unmapped prefix`` there instead (teacher ids the student cannot spell go to its longest token
  beginning their bytes); ``-none`` and ``-fill`` keep today's map and positions with
  ``--cross-uncovered none`` (the defaults issue #30 first measured) and ``ce``; ``-cw0.25``
  (``cross-both-cw0.25``) weighs the chunk term 0.25 (``--chunk-weight``; 1 by default), ``-c1to1``
  keeps it to 1:1 chunks (``--chunk-scope 1to1``);
- ``same-both``: a control, the teacher's tokenizer through ``--cross-tokenizer both`` (identity
  map): whether the chunk term helps whatever the tokenizers.

Held-out **bits per byte** (``distill eval --tasks heldout``) compares the two tokenizers. The
summary gives each mode's mean and seed spread (max − min) and, per cross mode, the share of the
same-tokenizer KD gain over CE that its own gain over ``cross-ce`` recovers:
``(cross-ce − mode) / (same-ce − same-kd)`` on seed means, and the same ratio seed by seed (each
seed's runs share their initialisation and batch order), whose range is the share's seed spread, and
the gain paired by seed with its standard error (``paired_gain_mean``, ``paired_gain_se``).
Stage one's draws add variance that one store's seeds do not show: ``--pool A.json,B.json`` summarises
result files over different stores (``distill teacher --seed``) with each (store, seed) one replicate.

The harder pair (issue #30; ``make bench-cross-real``): a real teacher (``--teacher
data/models/smollm2-135m``, 49,152 ids, its own tokenizer ``--teacher-tokenizer``), the project's
tokenizer as the student's (``--student-tokenizer data/tokenizer``, ``--cross-student
data/models/student.json``; the same-tokenizer students are ``--student
data/models/student-smollm2.json``, the same body at 49,152 ids) and text of a domain that
tokenizer was not trained on (``--corpus data/pydoc/train.jsonl.gz --heldout
data/pydoc/heldout.jsonl.gz``: the standard library's docstrings, data/PROVENANCE.md).

    python bench/cross_tokenizer.py --steps 120 --seeds 0,1,2 --out bench/results/cross_tokenizer_cpu.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDENT_TOKENIZER = ROOT / "data" / "tokenizer-4096"  # --student-tokenizer sets it
MODES = ("same-ce", "same-kd", "cross-ce", "cross-exact", "cross-chunk", "cross-both")
VARIANTS = {"-bucket": ["--unmapped", "bucket", "--cross-positions", "1to1", "--cross-uncovered", "none"],
            "-prefix": ["--unmapped", "prefix", "--cross-positions", "1to1", "--cross-uncovered", "none"],
            "-none": ["--cross-uncovered", "none"], "-fill": ["--cross-uncovered", "ce"],
            "-cw0.25": ["--chunk-weight", "0.25"], "-c1to1": ["--chunk-scope", "1to1"],
            "-lbucket": ["--cross-longer", "bucket"]}
CROSS = tuple(f"cross-{term}{variant}" for term in ("exact", "chunk", "both") for variant in ("", *VARIANTS))
CE_TWINS = ("same-ce", "cross-ce")


def distill(*args: str, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"distill {args[0]} failed; see {log}:\n" + log.read_text()[-2000:])


def student_flags(mode: str, work: Path, alpha: float = 0.5) -> list[str]:
    same = mode.startswith("same")
    flags = ["--train-store", work / "store", "--model", work / ("student-same.json" if same else "student-cross.json")]
    if mode == "same-both":
        flags += ["--cross-tokenizer", "both"]
    if not same:
        suffix = next((s for s in VARIANTS if mode.endswith(s)), "")
        term = mode.removeprefix("cross-").removesuffix(suffix) if suffix else mode.removeprefix("cross-")
        flags += ["--tokenizer", STUDENT_TOKENIZER,
                  "--cross-tokenizer", "exact" if mode == "cross-ce" else term]
        flags += VARIANTS.get(suffix, [])
    return flags + ["--alpha", "1" if mode in CE_TWINS else str(alpha)]


def summarise(runs: dict) -> dict:
    modes = {}
    for mode, by_seed in runs.items():
        bpb = [r["bits_per_byte"] for r in by_seed.values()]
        modes[mode] = {"seeds": len(bpb), "bits_per_byte_mean": statistics.fmean(bpb),
                       "bits_per_byte_spread": max(bpb) - min(bpb),
                       **{k: statistics.fmean(r[k] for r in by_seed.values())
                          for k in ("cross_exact_share", "cross_start_share", "cross_chunk_share", "cross_inside_share")
                          if all(k in r for r in by_seed.values())}}
    if {"same-ce", "same-kd", "cross-ce"} <= modes.keys():
        def mean(mode: str, seeds: list[str]) -> float:
            return statistics.fmean(runs[mode][s]["bits_per_byte"] for s in seeds)

        def spread(mode: str, seeds: list[str]) -> float:
            return max(runs[mode][s]["bits_per_byte"] for s in seeds) - min(runs[mode][s]["bits_per_byte"] for s in seeds)

        # every gain and share over the seeds both of its modes ran (merged files may hold more of one)
        same = sorted(set(runs["same-ce"]) & set(runs["same-kd"]))
        same_gain = mean("same-ce", same) - mean("same-kd", same)
        modes["same-kd"]["gain_over_ce"] = same_gain
        if "same-both" in modes:
            both = sorted(set(runs["same-ce"]) & set(runs["same-both"]))
            modes["same-both"]["gain_over_ce"] = mean("same-ce", both) - mean("same-both", both)
        for name in CROSS:
            if name not in modes:
                continue
            seeds = sorted(set(runs[name]) & set(runs["cross-ce"]) & set(same))
            if not seeds:
                continue
            gain = mean("cross-ce", seeds) - mean(name, seeds)
            same_gain_here = mean("same-ce", seeds) - mean("same-kd", seeds)
            modes[name] |= {"share_seeds": len(seeds), "gain_over_ce": gain,
                            "recovered_share": gain / same_gain_here if same_gain_here > 0 else None,
                            "gain_beyond_spread": gain > max(spread("cross-ce", seeds), spread(name, seeds))}
            # seed by seed: (cross-ce_s - mode_s) / (same-ce_s - same-kd_s)
            per_seed = {}
            for s in seeds:
                same_s = runs["same-ce"][s]["bits_per_byte"] - runs["same-kd"][s]["bits_per_byte"]
                gain_s = runs["cross-ce"][s]["bits_per_byte"] - runs[name][s]["bits_per_byte"]
                per_seed[s] = gain_s / same_s if same_s > 0 else None
            shares = [v for v in per_seed.values() if v is not None]
            if shares:
                modes[name] |= {"recovered_share_per_seed": per_seed, "recovered_share_min": min(shares),
                                "recovered_share_max": max(shares)}
            # paired by seed: the gain over the CE twin run for run, and its standard error
            gains = [runs["cross-ce"][s]["bits_per_byte"] - runs[name][s]["bits_per_byte"] for s in seeds]
            if len(gains) > 1:
                modes[name] |= {"paired_gain_mean": statistics.fmean(gains),
                                "paired_gain_se": statistics.stdev(gains) / len(gains) ** 0.5}
    return modes


# what must agree between result files pooled (the store and seeds may differ)
SETTINGS = ("teacher", "student", "cross_student", "teacher_tokenizer", "student_tokenizer", "corpus", "heldout",
            "steps", "micro_batch_size", "seq_len", "lr", "samples", "alpha", "student_args", "store_rows")


def pool(files: list[Path], out: Path) -> None:
    """Result files of the same settings over *different* stores (other stage-one draws), pooled: each
    (file, seed) is one replicate, named ``<file's stem>/<seed>``, so the summary's means, spreads and
    per-seed shares run over every store's seeds. The CE twins read no teacher predictions, so a file
    without them takes them from another file with the same seed. Files of other settings, or two of
    one store, are refused in one line."""
    parts = [json.loads(f.read_text()) for f in files]
    for key in SETTINGS:
        values = {json.dumps(part.get(key)) for part in parts}
        if len(values) > 1:
            raise SystemExit(f"--pool: the files differ in {key} ({', '.join(sorted(values))}); pool runs of the same "
                             f"settings only")
    stores = [part.get("store") for part in parts]
    named = [s for s in stores if s]
    if len(set(named)) < len(named):
        raise SystemExit(f"--pool: two files name the same store {stores}; runs of one store go together with --merge")
    if len({f.stem for f in files}) < len(files):
        raise SystemExit("--pool: two files have the same name; their runs would be labelled alike, rename one")
    twins = {mode: {seed: run for part in parts for seed, run in part["runs"].get(mode, {}).items()}
             for mode in CE_TWINS}
    runs: dict = {}
    for f, part in zip(files, parts):
        seeds = {seed for by_seed in part["runs"].values() for seed in by_seed}
        for mode in {*part["runs"], *CE_TWINS}:
            by_seed = part["runs"].get(mode, {})
            for seed in sorted(seeds):
                run = by_seed.get(seed) or (twins[mode].get(seed) if mode in CE_TWINS else None)
                if run is not None:
                    runs.setdefault(mode, {})[f"{f.stem}/{seed}"] = run
    result = {k: parts[0][k] for k in SETTINGS if k in parts[0]}
    result |= {"pooled_from": [str(f) for f in files], "stores": stores,
               "runs": runs, "summary": summarise(runs)}
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def merge(files: list[Path], out: Path) -> None:
    parts = [json.loads(f.read_text()) for f in files]
    runs: dict = {}
    for part in parts:
        for mode, by_seed in part["runs"].items():
            for seed, run in by_seed.items():
                if seed in runs.get(mode, {}) and runs[mode][seed]["bits_per_byte"] != run["bits_per_byte"]:
                    raise SystemExit(f"{mode} seed {seed} differs between the files merged")
                runs.setdefault(mode, {})[seed] = run
    result = parts[0] | {"runs": runs, "summary": summarise(runs), "merged_from": [str(f) for f in files],
                         "seeds": sorted({int(s) for by_seed in runs.values() for s in by_seed}),
                         "wall_s": [part["wall_s"] for part in parts]}  # each file's; they may have run side by side
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="data/models/teacher")
    parser.add_argument("--student", default="data/models/student.json",
                        help="the same-tokenizer students' config (at the teacher's vocabulary)")
    parser.add_argument("--cross-student", default="", help="the cross-tokenizer students' config "
                        "(default: --student at the student tokenizer's vocabulary)")
    parser.add_argument("--teacher-tokenizer", default="data/tokenizer", help="the store's tokenizer (the teacher's)")
    parser.add_argument("--student-tokenizer", default="data/tokenizer-4096")
    parser.add_argument("--corpus", default="data/corpus/train.jsonl.gz")
    parser.add_argument("--heldout", default="data/corpus/heldout.jsonl.gz")
    parser.add_argument("--docs", type=int, default=3000, help="training documents read (the store's rows come first)")
    parser.add_argument("--heldout-docs", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.5, help="CE weight of the distilled modes (the CE twins: 1)")
    parser.add_argument("--student-args", default="", help="more flags for every distilled student, one string")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench/results/cross_tokenizer_cpu.json")
    parser.add_argument("--previous", default="", help="a result file of the same settings whose runs are kept "
                        "(the store is rebuilt bit for bit: same rows, same draws)")
    parser.add_argument("--store", default="", help="a stage-one store kept (--keep-store) by a run of the same "
                        "settings: stage one is skipped (with --previous, its stage_one_s is kept)")
    parser.add_argument("--keep-store", default="", help="copy the stage-one store here, for --store")
    parser.add_argument("--pool", default="", help="comma-separated result files of the same settings over "
                        "different stores: each (file, seed) is one replicate; summarised to --out, nothing is trained")
    parser.add_argument("--merge", default="", help="comma-separated result files of the same settings and store "
                        "(e.g. one per seed, run side by side with --store): their runs, summarised, go to --out; "
                        "nothing is trained")
    args = parser.parse_args()
    if args.merge:
        merge([Path(f) for f in args.merge.split(",")], ROOT / args.out)
        return
    if args.pool:
        pool([Path(f) for f in args.pool.split(",")], ROOT / args.out)
        return
    global STUDENT_TOKENIZER
    STUDENT_TOKENIZER = ROOT / args.student_tokenizer
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()
    load_at_start = os.getloadavg()  # 1, 5 and 15 minutes: the machine is shared
    out = ROOT / args.out
    with tempfile.TemporaryDirectory(prefix="bench-cross-") as tmp:
        work = Path(tmp)
        os.environ["DISTILL_CACHE"] = str(work / "cache")
        with gzip.open(ROOT / args.corpus, "rt", encoding="utf-8") as f:
            docs = [line for _, line in zip(range(args.docs), f)]
        (work / "corpus.jsonl").write_text("".join(docs))
        rows = args.steps * args.micro_batch_size
        previous = json.loads(Path(args.previous).read_text()) if args.previous else {"runs": {}, "wall_s": 0.0}
        if args.store:  # stage one is the real teacher's slow part: a kept store of the same settings is reused
            shutil.copytree(ROOT / args.store, work / "store")
            stage_one_s = previous.get("stage_one_s")
        else:
            distill("prepare", "--input", work / "corpus.jsonl", "--out", work / "tokens", "--tokenizer",
                    ROOT / args.teacher_tokenizer, "--seq-len", args.seq_len, log=work / "prepare.log")
            t0 = time.time()
            distill("teacher", "--tokens-store", work / "tokens", "--teacher", ROOT / args.teacher, "--out",
                    work / "store", "--kind", "sampled", "--samples", args.samples, "--max-rows", rows,
                    "--device", args.device, log=work / "teacher.log")
            stage_one_s = time.time() - t0
            if args.keep_store:
                shutil.copytree(work / "store", ROOT / args.keep_store, dirs_exist_ok=True)
        student = json.loads((ROOT / args.student).read_text())
        (work / "student-same.json").write_text(json.dumps(student))
        if args.cross_student:
            cross_student = json.loads((ROOT / args.cross_student).read_text())
        else:
            from transformers import AutoTokenizer
            cross_student = student | {"vocab_size": len(AutoTokenizer.from_pretrained(STUDENT_TOKENIZER))}
        (work / "student-cross.json").write_text(json.dumps(cross_student))
        runs: dict = previous["runs"]
        for seed in seeds:
            for mode in args.modes.split(","):
                if str(seed) in runs.get(mode, {}):
                    continue
                run = work / f"{mode}-{seed}"
                t0 = time.time()
                extra = args.student_args.split() if mode not in CE_TWINS else []
                distill("student", *student_flags(mode, work, args.alpha), *extra, "--out", run, "--seed", seed,
                        "--max-steps", args.steps, "--micro-batch-size", args.micro_batch_size, "--lr", args.lr, "--warmup-steps",
                        max(1, args.steps // 10), "--eval-every", 0, "--checkpoint-every", 0, "--log-every", 10,
                        "--device", args.device, log=work / f"{mode}-{seed}.log")
                train_s = time.time() - t0
                distill("eval", "--model", run / "model", "--tasks", "heldout", "--heldout", ROOT / args.heldout,
                        "--limit", args.heldout_docs, "--out", work / f"{mode}-{seed}.json", "--device", args.device,
                        log=work / f"{mode}-{seed}-eval.log")
                heldout = json.loads((work / f"{mode}-{seed}.json").read_text())["tasks"]["heldout"]
                logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                shares = {k: statistics.fmean(r[k] for r in logged if k in r)
                          for k in ("cross_exact_share", "cross_start_share", "cross_chunk_share", "cross_inside_share")
                          if any(k in r for r in logged)}
                runs.setdefault(mode, {})[str(seed)] = {"bits_per_byte": heldout["bits_per_byte"],
                                                        "heldout_loss_per_token": heldout["loss"],
                                                        "train_s": train_s, "load_average": os.getloadavg(),
                                                        **shares}
                print(f"{mode} seed {seed}: {heldout['bits_per_byte']:.4f} bits/byte ({train_s:.0f} s)", flush=True)
                result = {"device": f"{args.device} ({platform.machine()}, {os.cpu_count()} cores)",
                          "load_average_at_start": load_at_start,
                          "teacher": args.teacher, "student": args.student,
                          "cross_student": args.cross_student or f"{args.student} at vocab {cross_student['vocab_size']}",
                          "teacher_tokenizer": args.teacher_tokenizer, "student_tokenizer": args.student_tokenizer,
                          "corpus": args.corpus, "heldout": args.heldout, "docs": len(docs), "steps": args.steps,
                          "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len, "lr": args.lr,
                          "samples": args.samples, "alpha": args.alpha, "student_args": args.student_args,
                          "store_rows": rows, "heldout_docs": args.heldout_docs,
                          "seeds": seeds, "stage_one_s": stage_one_s, "store": args.store or args.keep_store or None,
                          "wall_s": previous["wall_s"] + time.time() - started,
                          "runs": runs, "summary": summarise(runs)}
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")  # partial results survive
    for mode, m in result["summary"].items():
        extra = f", recovers {m['recovered_share']:.0%} of same-tokenizer KD's gain" \
            if m.get("recovered_share") is not None else ""
        print(f"{mode}: {m['bits_per_byte_mean']:.4f} bits/byte (spread {m['bits_per_byte_spread']:.4f}){extra}")


if __name__ == "__main__":
    main()
