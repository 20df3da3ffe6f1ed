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

NOTE = ("Issue #30's control: the harder pair's store (runs/cross-real-store, kept by make bench-cross-real) and "
        "settings, the student's tokenizer SmolLM2's own BPE cut to 8192 ids (scripts/truncate_bpe.py; every token "
        "a SmolLM2 token). The same-tokenizer students (same-ce, same-kd) are those of cross_tokenizer_real_cpu.json "
        "(same store, seeds and settings); the shares below divide by their gain seed by seed, as that file's "
        "recovered_share_per_seed does.")


def control(result: dict, same: dict) -> dict:
    runs, summary = same["runs"], same["summary"]
    seeds = sorted(result["runs"]["cross-both"])
    gain = {s: runs["same-ce"][s]["bits_per_byte"] - runs["same-kd"][s]["bits_per_byte"] for s in seeds}
    share = {s: (result["runs"]["cross-ce"][s]["bits_per_byte"] - result["runs"]["cross-both"][s]["bits_per_byte"])
             / gain[s] for s in seeds}
    ours = result["summary"]["cross-ce"]["bits_per_byte_mean"] - result["summary"]["cross-both"]["bits_per_byte_mean"]
    return {"same_tokenizer_gain_per_seed": gain, "recovered_share_per_seed": share,
            "recovered_share": ours / summary["same-kd"]["gain_over_ce"],
            "recovered_share_min": min(share.values()), "recovered_share_max": max(share.values()),
            "gain_over_ce": ours, "cross_ce_spread": result["summary"]["cross-ce"]["bits_per_byte_spread"],
            "project_tokenizer_recovered_share_per_seed": summary["cross-both"]["recovered_share_per_seed"],
            "project_tokenizer_recovered_share": summary["cross-both"]["recovered_share"],
            "project_tokenizer_gain_over_ce": summary["cross-both"]["gain_over_ce"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--same", type=Path, required=True)
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    result |= {"note": NOTE, "control": control(result, json.loads(args.same.read_text()))}
    args.result.write_text(json.dumps(result, indent=1))
    c = result["control"]
    print(f"recovered share {c['recovered_share']:.0%} ({c['recovered_share_min']:.0%}-{c['recovered_share_max']:.0%}), "
          f"project tokenizer {c['project_tokenizer_recovered_share']:.0%}")


if __name__ == "__main__":
    main()
