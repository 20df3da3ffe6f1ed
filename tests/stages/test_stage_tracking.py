"""``--report-to jsonl,tensorboard,wandb`` on the stages (issue #33): the scalars each stage logs, read back
from TensorBoard's event files and W&B's offline run files, and a SIGKILLed student continued with
``--resume auto`` that shows every step once in both, in the same TensorBoard directory and W&B run.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from stages import rounds
from tests.conftest import TOKENIZER, kill_when, make_teacher, one_line_error, run_cli, spawn, write_corpus, \
    write_tiny_model_config
from tests.pipeline.train.test_tracking import (jsonl, last_write_wins, tensorboard_hparams, tensorboard_scalars,
                                                wandb_history)

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

ALL = "jsonl,tensorboard,wandb"
STEPS = 8
# what every logged training step carries (CPU: no MFU without --peak-tflops; peak RSS, not GPU memory)
STEP_SCALARS = {"loss", "ce", "kd", "lr", "grad_norm", "tokens", "tokens_per_s", "step_s", "model_tflops_per_s",
                "peak_rss_gib", "teacher_temperature", "teacher_signal_share"}
HELDOUT_SCALARS = {"heldout_loss", "heldout_ppl", "heldout_tokens", "heldout_bits_per_byte"}


@pytest.fixture(scope="module", autouse=True)
def offline_wandb(tmp_path_factory):
    """W&B never reaches the network (subprocesses inherit this), its files inside the tests' directory."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            patch.setenv(name, str(home))
        yield


@pytest.fixture(scope="module")
def stores(tmp_path_factory, heldout_docs, offline_wandb):
    """Tokens stores (64-token rows) of 20 held-out documents and of 4, a random teacher, and stage one's
    sampled store over the train rows, written with every sink on (its tracking is checked below)."""
    root = tmp_path_factory.mktemp("tracking")
    for name, docs in (("train", heldout_docs[:20]), ("heldout", heldout_docs[:4])):
        corpus = write_corpus(root / f"{name}.jsonl", docs)
        result = run_cli("prepare", "--input", corpus, "--out", root / name, "--tokenizer", TOKENIZER,
                         "--seq-len", "64", "--rows-per-shard", "100")
        assert result.exit_code == 0, result.output
    make_teacher(root / "teacher")
    write_tiny_model_config(root / "tiny.json")
    return root


@pytest.fixture(scope="module")
def store(stores):
    result = run_cli("teacher", "--tokens-store", stores / "train", "--teacher", stores / "teacher", "--out",
                     stores / "store", "--samples", "8", "--rows-per-shard", "64", "--report-to", ALL)
    assert result.exit_code == 0, result.output
    return stores / "store"


def student_args(stores, store, out, *extra):
    return ["student", "--train-store", store, "--eval-store", stores / "heldout", "--model", stores / "tiny.json",
            "--out", out, "--max-steps", str(STEPS), "--micro-batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
            "--eval-rows", "16", "--eval-every", "4", "--log-every", "1", "--checkpoint-every", "2",
            "--report-to", ALL, "--resume", "auto", *map(str, extra)]


def test_stage_one_logs_each_shard(store):
    """222 rows in shards of 64: 4 shards, one record each (tokens/s, shards done, peak memory)."""
    lines = jsonl(store / "metrics.jsonl")
    assert [r["shards_done"] for r in lines] == [1, 2, 3, 4] and [r["step"] for r in lines] == [1, 2, 3, 4]
    assert [r["rows"] for r in lines] == [64, 64, 64, 30] and all(r["tokens_per_s"] > 0 for r in lines)
    scalars = tensorboard_scalars(store / "tensorboard")
    assert {tag: len(events) for tag, events in scalars.items()} == \
        {tag: 4 for tag in ("shards_done", "rows", "tokens_per_s", "shard_bytes", "peak_rss_gib")}
    assert scalars["shards_done"] == [(s, float(s)) for s in (1, 2, 3, 4)]
    per_file, config = wandb_history(store, (store / "wandb-run-id").read_text().strip())
    assert [[r["_step"] for r in rows] for rows in per_file] == [[1, 2, 3, 4]]
    assert config["kind"] == "sampled" and config["samples"] == 8
    assert tensorboard_hparams(store / "tensorboard")["params/samples"] == 8


def test_student_scalars_read_back_from_tensorboard_and_wandb(stores, store, tmp_path):
    out = tmp_path / "student"
    result = run_cli(*student_args(stores, store, out, "--peak-tflops", "1"))
    assert result.exit_code == 0, result.output
    lines = jsonl(out / "metrics.jsonl")
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert STEP_SCALARS | {"mfu"} <= set(steps[0])
    assert all(r["teacher_signal_share"] == 1.0 and r["teacher_temperature"] == 1.0 for r in steps)
    # MFU: 6N + 12·layers·d·seq FLOPs per token at the logged tokens/s, over 1 TFLOP/s
    model_flops = json.loads((out / "metrics.json").read_text())["parameters"] * 6 + 12 * 2 * 32 * 64
    # (the log rounds to 6 decimals)
    assert steps[0]["mfu"] == pytest.approx(model_flops * steps[0]["tokens_per_s"] / 1e12, abs=1e-6)
    held = [r for r in lines if "heldout_loss" in r]
    assert [r["step"] for r in held] == [4, STEPS] and HELDOUT_SCALARS <= set(held[0])
    assert 1 < held[-1]["heldout_bits_per_byte"] < 8  # nats/token over ~3.5 bytes/token of English, untrained

    tb = tensorboard_scalars(out / "tensorboard")
    counts = Counter({tag: len(events) for tag, events in tb.items()})
    # each (step, name) once: an evaluation's record repeats its step's tokens
    expected = Counter(k for k, _ in {(k, r["step"]) for r in lines for k in r if k not in ("step", "final")})
    assert counts == expected and counts["loss"] == STEPS and counts["heldout_loss"] == 2
    assert tb["loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert tensorboard_hparams(out / "tensorboard")["store_kind"] == "sampled"

    per_file, config = wandb_history(out, (out / "wandb-run-id").read_text().strip())
    assert len(per_file) == 1
    rows = per_file[0]
    assert [r["_step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[3]["heldout_loss"] == pytest.approx(held[0]["heldout_loss"], rel=1e-6)  # joined step 4's row
    assert {k: sum(k in r for r in rows) for k in STEP_SCALARS | HELDOUT_SCALARS} == \
        {k: expected[k] for k in STEP_SCALARS | HELDOUT_SCALARS}
    assert config["alpha"] == 0.5 and config["store_kind"] == "sampled" and config["parameters"] > 0


def test_a_killed_student_resumed_shows_each_step_once(stores, store, tmp_path, monkeypatch):
    """SIGKILL once step 5 is logged (past the checkpoint at 4), then --resume auto: TensorBoard's one
    directory and W&B's one run hold each step once; TensorBoard has the resumed run's values (the
    last write), as metrics.jsonl does."""
    # each run starts its own W&B service, as a requeued job does (not this process's: the killed run's
    # stream would stay open in it, and W&B refuses a second stream of the same run id)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    out = tmp_path / "killed"
    process = spawn(student_args(stores, store, out))
    log = out / "metrics.jsonl"
    kill_when(process, lambda: log.exists() and any(json.loads(x).get("step", 0) >= 5
                                                    for x in log.read_text().splitlines()[:-1] + [""] if x))
    before = jsonl(log)
    run_id = (out / "wandb-run-id").read_text().strip()
    resumed = spawn(student_args(stores, store, out))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resumed from" in output

    lines = jsonl(log)
    steps = {r["step"]: r for r in lines if "loss" in r}
    assert sorted(steps) == list(range(1, STEPS + 1)) and max(r["step"] for r in before) >= 5
    tb = tensorboard_scalars(out / "tensorboard")
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one directory, both processes
    for tag in STEP_SCALARS:
        assert [s for s, _ in tb[tag]] == list(range(1, STEPS + 1)), tag  # each step once
    assert [s for s, _ in tb["heldout_loss"]] == [4, STEPS]
    assert tb["loss"] == [(s, pytest.approx(steps[s]["loss"], rel=1e-6)) for s in range(1, STEPS + 1)]
    assert tb["tokens"] == [(s, 504.0 * s) for s in range(1, STEPS + 1)]

    assert (out / "wandb-run-id").read_text().strip() == run_id  # the same run
    per_file, _ = wandb_history(out, run_id)
    assert len(per_file) == 2  # a run file per process; the killed one's holds what W&B's service had written
    rows = last_write_wins(per_file)  # and checks that no file holds a step twice
    assert list(rows) == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows.values()] == [pytest.approx(steps[s]["loss"], rel=1e-5) for s in rows]
    assert [s for s, r in rows.items() if "heldout_loss" in r] == [4, STEPS]


def test_eval_logs_every_task_at_the_models_step(stores, store, tmp_path):
    out = tmp_path / "student"
    assert run_cli(*student_args(stores, store, out, "--max-steps", "2")).exit_code == 0
    report = tmp_path / "eval" / "student.json"
    result = run_cli("eval", "--model", out / "model", "--out", report, "--tasks", "heldout,lambada", "--limit", "3",
                     "--report-to", "tensorboard,wandb")
    assert result.exit_code == 0, result.output
    tasks = json.loads(report.read_text())["tasks"]
    tb = tensorboard_scalars(tmp_path / "eval" / "tensorboard" / "student")
    assert tb["heldout/bits_per_byte"] == [(2, pytest.approx(tasks["heldout"]["bits_per_byte"], rel=1e-6))]
    assert tb["lambada/acc"] == [(2, pytest.approx(tasks["lambada"]["acc"]))]
    assert len(tb) == sum(len(m) for m in tasks.values())
    assert jsonl(tmp_path / "eval" / "student.metrics.jsonl")[0]["heldout/loss"] == \
        pytest.approx(tasks["heldout"]["loss"], rel=1e-5)
    per_file, config = wandb_history(tmp_path / "eval", (tmp_path / "eval" / "student.wandb-run-id").read_text().strip())
    assert [[r["_step"] for r in rows] for rows in per_file] == [[2]] and config["stage"] == "eval"
    assert per_file[0][0]["heldout/bits_per_byte"] == pytest.approx(tasks["heldout"]["bits_per_byte"], rel=1e-6)


def test_rounds_log_a_record_per_finished_round(tmp_path):
    result = {"round": 2, "reverse_kl_per_token": 0.5, "reverse_kl_stderr": None, "teacher_tokens_total": 640,
              "teacher_scored_total": 512, "tasks": {"heldout": {"loss": 3.5, "bits_per_byte": 1.25, "tokens": 99}}}
    assert rounds.round_record(result) == {"step": 2, "reverse_kl_per_token": 0.5, "teacher_tokens_total": 640,
                                           "teacher_scored_total": 512, "eval/heldout/loss": 3.5,
                                           "eval/heldout/bits_per_byte": 1.25}
    config = rounds.RoundsConfig(out=str(tmp_path), prompts="p", heldout_prompts="h", student="s",
                                 report_to=("jsonl", "tensorboard"))
    for r in (0, 1):
        (tmp_path / f"round-{r:03d}").mkdir()
        (tmp_path / f"round-{r:03d}" / "round.json").write_text("{}")
        tracker = rounds.rounds_tracker(config, tmp_path, 64)
        tracker.log(**rounds.round_record({"round": r, "reverse_kl_per_token": 1.0 / (r + 1)}))
        tracker.close()
    tracker = rounds.rounds_tracker(config, tmp_path, 64)  # a rerun after round 1 finished: nothing repeated
    tracker.close()
    assert [r["step"] for r in jsonl(tmp_path / "metrics.jsonl")] == [0, 1]
    assert tensorboard_scalars(tmp_path / "tensorboard")["reverse_kl_per_token"] == [(0, 1.0), (1, 0.5)]


def test_a_missing_tracking_package_is_one_line(stores, tmp_path, monkeypatch):
    from pipeline.train import tracking

    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    for command in (["student", "--train-store", stores / "train", "--out", tmp_path / "s", "--report-to", "wandb"],
                    ["teacher", "--tokens-store", stores / "train", "--teacher", stores / "teacher",
                     "--out", tmp_path / "t", "--report-to", "jsonl,wandb"]):
        line = one_line_error(run_cli(*command))
        assert "pip install 'distill[tracking]'" in line and "wandb" in line
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()
    line = one_line_error(run_cli("student", "--train-store", stores / "train", "--out", tmp_path / "s",
                                  "--report-to", "jsonl,mlflow"))
    assert "unknown sink(s) mlflow" in line


def test_a_preempted_student_closes_its_sinks_and_the_requeued_run_continues_them(stores, store, tmp_path,
                                                                                 monkeypatch):
    """SIGUSR1 after step 3 is logged: the run stops at a whole step (exit 75) with W&B's run marked as
    pre-empting and ended (its file complete), TensorBoard closed; the rerun continues both, each step once."""
    import signal
    import time

    from tests.pipeline.train.test_tracking import wandb_records

    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    out = tmp_path / "preempted"
    process = spawn(student_args(stores, store, out))
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and any(json.loads(x).get("step", 0) >= 3 for x in log.read_text().splitlines()[:-1])):
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
        time.sleep(0.01)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output
    stopped = json.loads((out / "preempted.json").read_text())["step"]
    run_id = (out / "wandb-run-id").read_text().strip()
    per_file, _ = wandb_history(out, run_id)  # waits for the exit record: the run was ended, not abandoned
    assert [r["_step"] for r in per_file[0]] == list(range(1, stopped + 1))
    [first] = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert "preempting" in {r.WhichOneof("record_type") for r in wandb_records(first)}

    resumed = spawn(student_args(stores, store, out))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    steps = {r["step"]: r for r in jsonl(log) if "loss" in r}
    per_file, _ = wandb_history(out, run_id)
    rows = last_write_wins(per_file)
    assert len(per_file) == 2 and list(rows) == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows.values()] == [pytest.approx(steps[s]["loss"], rel=1e-5) for s in rows]
    tb = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in tb["loss"]] == list(range(1, STEPS + 1)) and [s for s, _ in tb["heldout_loss"]] == [4, STEPS]
