"""Issue #30's control: a cross-tokenizer result (``cross-ce``, ``cross-both``) of another student
tokenizer on the same store and settings, as a share of ``--same``'s same-tokenizer gain (its
``same-ce`` and ``same-kd`` runs), seed by seed as ``bench/cross_tokenizer.py`` computes its own
shares, beside ``--same``'s own ``cross-both`` share. Adds ``note`` and ``control`` to ``--result``.

    python bench/cross_control.py --result bench/results/cross_tokenizer_real_trunc8k_cpu.json \
        --same bench/results/cross_tokenizer_real_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NOTE = ("Issue #30's control: the harder pair's store and settings ({steps} steps), the student's tokenizer SmolLM2's "
        "own BPE cut to 8192 ids (scripts/truncate_bpe.py; every token a SmolLM2 token). The same-tokenizer students "
        "(same-ce, same-kd) are those of {same} (same store, seeds and settings); the shares below divide by their "
        "gain seed by seed, as that file's recovered_share_per_seed does.")


def share(result: dict, same: dict, mode: str) -> dict:
    """``mode``'s gain over ``result``'s CE twin as a share of ``same``'s same-tokenizer gain, seed by seed."""
    runs, seeds = same["runs"], sorted(result["runs"][mode])
    gain = {s: runs["same-ce"][s]["bits_per_byte"] - runs["same-kd"][s]["bits_per_byte"] for s in seeds}
    per_seed = {s: (result["runs"]["cross-ce"][s]["bits_per_byte"] - result["runs"][mode][s]["bits_per_byte"])
                / gain[s] for s in seeds}
    ours = result["summary"]["cross-ce"]["bits_per_byte_mean"] - result["summary"][mode]["bits_per_byte_mean"]
    return {"same_tokenizer_gain_per_seed": gain, "recovered_share_per_seed": per_seed,
            "recovered_share": ours / same["summary"]["same-kd"]["gain_over_ce"],
            "recovered_share_min": min(per_seed.values()), "recovered_share_max": max(per_seed.values()),
            "gain_over_ce": ours, "cross_ce_spread": result["summary"]["cross-ce"]["bits_per_byte_spread"],
            "project_tokenizer_recovered_share_per_seed": same["summary"][mode]["recovered_share_per_seed"],
            "project_tokenizer_recovered_share": same["summary"][mode]["recovered_share"],
            "project_tokenizer_gain_over_ce": same["summary"][mode]["gain_over_ce"]}


def control(result: dict, same: dict) -> dict:
    """``cross-both``'s share at the top level (as first written), and every cross mode both files ran by name."""
    modes = [m for m in ("cross-both", "cross-exact") if m in result["runs"] and m in same["summary"]]
    return share(result, same, "cross-both") | {"by_mode": {m: share(result, same, m) for m in modes}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--same", type=Path, required=True)
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    same = json.loads(args.same.read_text())
    if same["steps"] != result["steps"] or same["seeds"] != result["seeds"]:
        raise SystemExit(f"{args.same} ran {same['steps']} steps over seeds {same['seeds']}, {args.result} "
                         f"{result['steps']} over {result['seeds']}: compare runs of the same settings")
    result |= {"note": NOTE.format(steps=result["steps"], same=args.same.name), "control": control(result, same)}
    args.result.write_text(json.dumps(result, indent=1))
    for mode, c in result["control"]["by_mode"].items():
        print(f"{mode}: recovered share {c['recovered_share']:.0%} ({c['recovered_share_min']:.0%}-"
              f"{c['recovered_share_max']:.0%}), project tokenizer {c['project_tokenizer_recovered_share']:.0%}")


if __name__ == "__main__":
    main()
