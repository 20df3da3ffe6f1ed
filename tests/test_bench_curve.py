"""bench/curve.py's arithmetic (issue #34): where a curve crosses a target, tokens-to-target and its
bootstrap, the paired per-step differences; and, slow, the whole benchmark at toy size."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_curve", ROOT / "bench" / "curve.py")
curve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curve)


def points(values, every=100, tokens_per_step=10):
    return [{"step": every * (i + 1), "tokens": every * (i + 1) * tokens_per_step, "bits_per_byte": v, "loss": v}
            for i, v in enumerate(values)]


def test_crossing_is_linear_between_evaluations_and_none_when_never_reached():
    curve_points = [(1000, 3.0), (2000, 2.0), (3000, 1.5)]
    assert curve.crossing(curve_points, 2.5) == pytest.approx(1500.0)
    assert curve.crossing(curve_points, 2.0) == pytest.approx(2000.0)
    assert curve.crossing(curve_points, 1.75) == pytest.approx(2500.0)
    assert curve.crossing(curve_points, 1.0) is None
    assert curve.crossing(curve_points, 3.5) == 1000.0  # reached at the first point: all that is known


def test_tokens_to_target_reads_the_distilled_mean_curve_at_ce_final_mean():
    # CE ends at mean 2.0 after 4000 tokens; distilled mean curve (2.6, 2.2, 1.8, 1.7) reaches 2.0 halfway
    # between 2000 and 3000 tokens: 2500 / 4000 = 0.625 of the tokens, a 1.6x speed-up
    ce = [points([3.0, 2.6, 2.3, 2.1]), points([3.0, 2.6, 2.3, 1.9])]
    kd = [points([2.7, 2.3, 1.9, 1.8]), points([2.5, 2.1, 1.7, 1.6])]
    t = curve.tokens_to_target(ce, kd)
    assert t["target_bits_per_byte"] == pytest.approx(2.0)
    assert t["ce_tokens"] == 4000
    assert t["kd_tokens"] == pytest.approx(2500.0)
    assert t["share"] == pytest.approx(0.625)
    assert t["speedup"] == pytest.approx(1.6)
    assert not t["at_first_evaluation"]
    worse = [points([3.1, 2.7, 2.4, 2.2])]
    assert curve.tokens_to_target(ce, worse)["speedup"] is None


def test_bootstrap_interval_brackets_the_point_estimate_and_counts_draws_not_reached():
    ce = [points([3.0, 2.6, 2.3, 2.0 + d]) for d in (-0.05, 0.0, 0.05)]
    kd = [points([2.6 + d, 2.2 + d, 1.9 + d, 1.8 + d]) for d in (-0.05, 0.0, 0.05)]
    point = curve.tokens_to_target(ce, kd)["speedup"]
    b = curve.bootstrap(ce, kd, draws=500)
    assert b["speedup_p05"] <= point <= b["speedup_p95"]
    assert b["speedup_p05"] < b["speedup_p95"]
    assert b["not_reached_share"] == 0.0
    same = curve.bootstrap(ce, [points([3.0, 2.6, 2.3, 2.0 + d]) for d in (0.3, 0.3, 0.3)], draws=200)
    assert same["not_reached_share"] == 1.0 and same["speedup_p95"] == 0.0


def test_summary_pairs_each_seed_and_gives_spreads():
    runs = {"same-ce": {"0": points([3.0, 2.0]), "1": points([3.2, 2.2])},
            "same-kd": {"0": points([2.8, 1.9]), "1": points([2.8, 2.0])}}
    s = curve.summarise(runs, draws=50)
    arm = s["arms"]["same-ce"]["curve"]
    assert [r["mean"] for r in arm] == pytest.approx([3.1, 2.1])
    assert arm[0]["sd"] == pytest.approx(0.1414213, abs=1e-6)
    by_step = s["pairs"]["same-kd"]["by_step"]
    assert [r["diff_mean"] for r in by_step] == pytest.approx([-0.3, -0.15])
    assert (by_step[0]["diff_min"], by_step[0]["diff_max"]) == pytest.approx((-0.4, -0.2))
    assert "cross-kd" not in s["pairs"]


def test_arms_flags_run_ce_kd_t2_and_alpha0_from_one_store(tmp_path):
    flags = {arm: [str(f) for f in curve.arm_flags(arm, tmp_path, 0.5)]
             for arm in ("same-ce", "same-kd", "cross-ce", "cross-kd", "same-kd-t2", "same-kd-a0")}
    get = lambda arm, name: flags[arm][flags[arm].index(name) + 1]  # noqa: E731
    assert [get(a, "--alpha") for a in flags] == ["1.0", "0.5", "1.0", "0.5", "0.5", "0.0"]
    assert [get(a, "--temperature") for a in flags] == ["1", "1", "1", "1", "2", "1"]
    assert get("cross-kd", "--cross-tokenizer") == "both" and get("cross-ce", "--cross-tokenizer") == "exact"
    assert "--cross-tokenizer" not in flags["same-kd"]
    assert get("cross-kd", "--eval-store").endswith("heldout-cross")
    assert get("same-ce", "--eval-store").endswith("heldout-same")
    assert len({get(a, "--train-store") for a in flags}) == 1


@pytest.mark.slow
def test_bench_curve_runs_end_to_end_at_toy_size(tmp_path):
    """The shipped teacher and tokenizers, 6 steps, 2 seeds: every arm's curve, the teacher line, the
    summary, the figure."""
    out, figure = tmp_path / "curve.json", tmp_path / "curve.png"
    cross = json.loads((ROOT / "data/models/student.json").read_text()) | {"vocab_size": 4096}
    (tmp_path / "cross.json").write_text(json.dumps(cross))
    subprocess.run([sys.executable, "bench/curve.py", "--teacher", "data/models/teacher", "--student",
                    "data/models/student.json", "--cross-student", tmp_path / "cross.json", "--cross-tokenizer",
                    "data/tokenizer-4096", "--rows", "24", "--steps", "6", "--micro-batch-size", "2", "--seq-len", "32",
                    "--eval-every", "2", "--heldout-docs", "4", "--seeds", "0,1", "--samples", "4", "--bootstrap", "50",
                    "--work", tmp_path / "work", "--out", out, "--figure", figure],
                   cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"same-ce", "same-kd", "cross-ce", "cross-kd", "same-kd-t2", "same-kd-a0"}
    assert [p["step"] for p in result["runs"]["same-kd"]["1"]] == [2, 4, 6]
    assert set(result["runs"]["same-kd-t2"]) == {"0"}
    assert 0 < result["teacher_heldout"]["bits_per_byte"] < 10
    assert set(result["summary"]["pairs"]) == {"same-kd", "cross-kd"}
    assert figure.stat().st_size > 10_000


def test_resume_keeps_the_finished_runs_of_the_same_settings_and_refuses_others(tmp_path):
    """--resume reads an earlier result before any work: its runs stand beside the new ones only when every
    setting that shapes a curve is the same."""
    import argparse

    args = argparse.Namespace(scale="cpu", teacher="t", student="s.json", cross_student="c.json", cross_tokenizer="tok",
                              corpus="train", heldout="heldout", heldout_docs=40, rows=1200, seq_len=128, steps=600,
                              micro_batch_size=4, eval_every=50, lr=2e-3, min_lr_ratio=0.1, alpha=0.5, samples=32,
                              dtype="auto", cross_uncovered="teacher", out="curve.json")
    out = tmp_path / "curve.json"
    assert curve.resumed(args, out) == ({}, {}, 0.0)  # nothing yet
    runs = {"same-ce": {"0": points([2.0, 1.9])}}
    out.write_text(json.dumps({**curve.settings(args), "runs": runs, "train_s": {"same-ce": {"0": 12.0}},
                               "wall_s": 99.0}))
    assert curve.resumed(args, out) == (runs, {"same-ce": {"0": 12.0}}, 99.0)
    args.lr, args.steps = 1e-3, 300
    with pytest.raises(SystemExit, match=r"other settings \(steps, lr\)"):
        curve.resumed(args, out)
    args.lr, args.steps, args.cross_uncovered = 2e-3, 600, "none"  # the committed curves ran 'none'
    with pytest.raises(SystemExit, match=r"other settings \(cross_uncovered\)"):
        curve.resumed(args, out)
