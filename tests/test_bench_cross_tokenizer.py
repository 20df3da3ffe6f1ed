"""bench/cross_tokenizer.py's summary (issue #30): the share of the same-tokenizer gain on seed means and
seed by seed, the gain paired by seed with its standard error, and results over several stores pooled
with each (store, seed) one replicate."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cross_tokenizer_bench", ROOT / "bench" / "cross_tokenizer.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def runs_of(table: dict[str, list[float]], seeds=("0", "1")) -> dict:
    return {mode: {s: {"bits_per_byte": v} for s, v in zip(seeds, values)} for mode, values in table.items()}


def test_summary_shares_and_paired_gain():
    runs = runs_of({"same-ce": [2.0, 2.2], "same-kd": [1.9, 2.0], "cross-ce": [2.5, 2.6], "cross-both": [2.45, 2.5]})
    m = bench.summarise(runs)["cross-both"]
    same_gain = 2.1 - 1.95
    assert m["gain_over_ce"] == pytest.approx(2.55 - 2.475)
    assert m["recovered_share"] == pytest.approx(0.075 / same_gain)
    assert m["recovered_share_per_seed"] == pytest.approx({"0": 0.05 / 0.1, "1": 0.1 / 0.2})
    assert m["paired_gain_mean"] == pytest.approx(0.075)
    assert m["paired_gain_se"] == pytest.approx(statistics.stdev([0.05, 0.1]) / 2 ** 0.5)
    # the spread is the larger of the two modes' ranges: 0.1 (cross-ce) against a gain of 0.075
    assert m["gain_beyond_spread"] is False


def test_pool_makes_each_store_and_seed_a_replicate(tmp_path):
    # store B's file has no CE twins: they read no teacher predictions, so A's of the same seed stand in
    a = {"store": "runs/a", "steps": 320,
         "runs": runs_of({"same-ce": [2.0, 2.2], "same-kd": [1.9, 2.0], "cross-ce": [2.5, 2.6], "cross-both": [2.45, 2.5]})}
    b = {"store": "runs/b", "steps": 320, "runs": runs_of({"same-kd": [1.8, 2.1], "cross-both": [2.4, 2.58]})}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = tmp_path / "pooled.json"
    bench.pool([tmp_path / "a.json", tmp_path / "b.json"], out)
    pooled = json.loads(out.read_text())
    assert pooled["stores"] == ["runs/a", "runs/b"] and pooled["steps"] == 320
    assert sorted(pooled["runs"]["cross-ce"]) == ["a/0", "a/1", "b/0", "b/1"]
    assert pooled["runs"]["cross-ce"]["b/1"] == {"bits_per_byte": 2.6}
    m = pooled["summary"]["cross-both"]
    assert m["seeds"] == 4
    assert m["bits_per_byte_mean"] == pytest.approx((2.45 + 2.5 + 2.4 + 2.58) / 4)
    same_gain = (2.0 + 2.2 + 2.0 + 2.2) / 4 - (1.9 + 2.0 + 1.8 + 2.1) / 4
    assert m["recovered_share"] == pytest.approx((2.55 - m["bits_per_byte_mean"]) / same_gain)
    assert m["recovered_share_per_seed"]["b/0"] == pytest.approx(0.1 / 0.2)
    assert m["recovered_share_per_seed"]["b/1"] == pytest.approx(0.02 / 0.1)
    assert m["bits_per_byte_spread"] == pytest.approx(2.58 - 2.4)


def test_summary_compares_over_the_seeds_both_modes_ran():
    # merged files: the twins and same-tokenizer students over seeds 0-2, the mode over 0 and 1 only
    runs = runs_of({"same-ce": [2.0, 2.2, 2.4], "same-kd": [1.9, 2.0, 2.0], "cross-ce": [2.5, 2.6, 2.3],
                    "cross-both": [2.45, 2.5]}, seeds=("0", "1", "2"))
    runs["cross-both"] = {s: runs["cross-both"][s] for s in ("0", "1")}
    summary = bench.summarise(runs)
    m = summary["cross-both"]
    assert m["share_seeds"] == 2
    assert m["gain_over_ce"] == pytest.approx(m["paired_gain_mean"]) == pytest.approx(0.075)
    assert m["recovered_share"] == pytest.approx(0.075 / 0.15)  # seeds 0 and 1's same-tokenizer gain
    assert summary["same-kd"]["gain_over_ce"] == pytest.approx((0.1 + 0.2 + 0.4) / 3)
    assert m["gain_beyond_spread"] is False  # cross-ce's range over seeds 0 and 1: 0.1


def test_pool_refuses_other_settings_and_one_store_twice(tmp_path):
    runs = runs_of({"same-ce": [2.0], "same-kd": [1.9], "cross-ce": [2.5], "cross-both": [2.45]}, seeds=("0",))
    files = []
    for name, store, steps in (("a", "runs/a", 320), ("b", "runs/b", 80), ("c", "runs/a", 320)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps({"store": store, "steps": steps, "runs": runs}))
    with pytest.raises(SystemExit, match="differ in steps"):
        bench.pool(files[:2], tmp_path / "out.json")
    with pytest.raises(SystemExit, match="same store"):
        bench.pool([files[0], files[2]], tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
