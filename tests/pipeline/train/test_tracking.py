"""The tracker (pipeline/train/tracking.py): records fanned out to jsonl, TensorBoard and W&B, resumes that
show each step once, and the cost scalars (FLOPs per token, MFU, peak memory).

The sinks are read back as a user's tools read them: TensorBoard's ``EventAccumulator`` (which applies
the purge a resumed run writes) and W&B's offline run files (``run-ID.wandb``: a LevelDB-style log of
``wandb_internal_pb2.Record`` protobufs, parsed by :func:`wandb_history`). No network: W&B is offline.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import DistillError
from pipeline.train import tracking
from pipeline.train.metrics import MetricsLog, target_bytes
from pipeline.train.tracking import Tracker, TrackerPaths


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B never reaches the network, and keeps its settings and cache inside the test's directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


# ---------------------------------------------------------------------- readers


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """tag → [(step, value)] as TensorBoard shows them (purged events hidden), in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_hparams(directory: Path) -> dict[str, object]:
    """The hyper-parameters the run wrote (the hparams plugin's session start)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(directory))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    hparams = data.session_start_info.hparams
    return {k: (v.string_value or v.number_value or v.bool_value) for k, v in hparams.items()}


def wandb_records(path: Path):
    """The protobuf records of one W&B run file (W&B's LevelDB-style log: a 7-byte file header, then
    32 KiB blocks of records each with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)


def wandb_history(wandb_dir: Path, run_id: str) -> tuple[list[list[dict[str, float]]], dict[str, object]]:
    """(the history rows of each offline run file of ``run_id`` — one per process that ran it, in the
    order they ran —, the run's config)."""
    files = sorted(p for p in (wandb_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    # finish() may return before W&B's service has written the run's last records: wait for its exit record
    deadline = time.time() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(files[-1])):
        assert time.time() < deadline, f"{files[-1]} has no exit record"
        time.sleep(0.1)
    per_file, config = [], {}
    for file in files:
        rows = []
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            elif kind == "run":
                config |= {u.key: json.loads(u.value_json) for u in record.run.config.update}
            elif kind == "config":
                config |= {u.key: json.loads(u.value_json) for u in record.config.update}
        per_file.append(rows)
    return per_file, config


def last_write_wins(per_file: list[list[dict]]) -> dict[int, dict]:
    """step → its row as W&B ends up with it (``wandb sync`` replays the files in order); checks first
    that no file holds a step twice."""
    rows: dict[int, dict] = {}
    for file_rows in per_file:
        steps = [r["_step"] for r in file_rows]
        assert len(steps) == len(set(steps)), steps
        rows |= {r["_step"]: r for r in file_rows}
    return dict(sorted(rows.items()))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------- sink-independent parts


def test_report_to_names_sinks_and_a_missing_package_is_one_line(monkeypatch):
    assert tracking.report_to_problems(("jsonl", "tensorboard", "wandb")) == []
    assert tracking.report_to_problems(("jsonl", "mlflow")) == \
        ["report_to: unknown sink(s) mlflow; choose from jsonl, tensorboard, wandb"]
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    tracking.check_installed(("jsonl", "tensorboard"))
    with pytest.raises(DistillError) as e:
        tracking.check_installed(("jsonl", "wandb"))
    assert "\n" not in str(e.value) and "pip install 'distill[tracking]'" in str(e.value)


def test_flops_per_token_mfu_and_peaks(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(tied: bool):
        return LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, max_position_embeddings=64,
                                            tie_word_embeddings=tied))

    tied, untied = llama(True), llama(False)
    n_tied = sum(p.numel() for p in tied.parameters())  # the shared matrix once: the head multiplies by it
    n_untied = sum(p.numel() for p in untied.parameters()) - 1000 * 32  # the input lookup costs nothing
    assert n_tied == n_untied
    attention = 12 * 2 * 32 * 64
    assert tracking.flops_per_token(tied, 64) == 6 * n_tied + attention
    assert tracking.flops_per_token(untied, 64) == 6 * n_untied + attention
    # 1e6 FLOPs per token at 1e6 tokens/s on 2 devices of 1 TFLOP/s: half of their peak
    assert tracking.mfu(1e6, 1e6, 1.0, devices=2) == pytest.approx(0.5)
    assert tracking.mfu(1e6, 1e6, None) is None
    assert tracking.default_peak_tflops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert tracking.default_peak_tflops(torch.device("cuda:0")) == peak
    cost = tracking.StepCost(1e9, 100.0, 1, torch.device("cpu"))
    scalars = cost.scalars(1e4)  # 1e13 FLOP/s of a 100 TFLOP/s peak
    assert scalars["mfu"] == pytest.approx(0.1) and scalars["model_tflops_per_s"] == pytest.approx(10.0)
    assert 0.01 < scalars["peak_rss_gib"] < 1024
    assert "mfu" not in tracking.StepCost(1e9, None, 1, torch.device("cpu")).scalars(1e4)


def test_teacher_signal_share_and_target_bytes():
    assert tracking.teacher_signal_scalars(False, 2.0, {}) == {"teacher_signal_share": 0.0}
    assert tracking.teacher_signal_scalars(True, 2.0, {}) == {"teacher_temperature": 2.0, "teacher_signal_share": 1.0}
    cross = {"cross_start_share": 0.9, "cross_exact_share": 0.7}
    assert tracking.teacher_signal_scalars(True, 1.0, cross)["teacher_signal_share"] == 0.9
    assert tracking.teacher_signal_scalars(True, 1.0, cross, "1to1")["teacher_signal_share"] == 0.7
    byte_lengths = torch.tensor([0, 1, 2, 3])
    ids = torch.tensor([[1, 2, 3, 0], [3, 3, 1, 2]])  # targets: 2 3 0 | 3 1 2
    assert target_bytes(ids, None, byte_lengths) == 2 + 3 + 0 + 3 + 1 + 2
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0]])  # predicting positions 1, 2 | 0
    assert target_bytes(ids, mask, byte_lengths) == 3 + 0 + 3


def test_jsonl_alone_and_the_log_keeps_the_resumed_steps_records(tmp_path):
    paths = TrackerPaths.in_dir(tmp_path)
    tracker = Tracker(paths, ("jsonl",), {"lr": 1e-3}, resume_step=None, name="run")
    for step in range(1, 6):
        tracker.log(step=step, loss=1.0 / step, note="text stays in the log")
    tracker.log(step=5, heldout_loss=0.1, final=True)
    tracker.close()
    assert [r["step"] for r in jsonl(paths.jsonl)] == [1, 2, 3, 4, 5, 5]
    log = MetricsLog(paths.jsonl, resume_step=3)
    log.close()
    assert [r["step"] for r in jsonl(paths.jsonl)] == [1, 2, 3] and log.dropped == 3
    assert log.kept[-1] == {"step": 3, "loss": round(1 / 3, 6), "note": "text stays in the log"}
    assert not paths.tensorboard.exists() and not paths.wandb_run.exists()
    assert [step for step, _ in tracking.merged_by_step(jsonl(paths.jsonl))] == [1, 2, 3]


# ---------------------------------------------------------------------- the sinks, read back


def run_twice(tmp_path: Path, report_to: tuple[str, ...]) -> TrackerPaths:
    """Steps 1…6 logged, the run "dies" without closing, and a resumed run from step 3 logs 4…8 with
    other values (plus an evaluation record at 6, the same step as a training one)."""
    paths = TrackerPaths.in_dir(tmp_path / "out")
    first = Tracker(paths, report_to, {"lr": 1e-3, "model": {"layers": 2}}, resume_step=None, name="out")
    for step in range(1, 7):
        first.log(step=step, loss=10.0 + step, tokens=100 * step)
    # what a SIGKILL leaves: the log as written, TensorBoard's records flushed as logged, W&B's run file as far
    # as its service got (here all of it: ended, so that this process may start the next run), nothing closed
    first.metrics.close()
    if "wandb" in first.sinks:
        first.sinks["wandb"].run.finish()
        time.sleep(1.1)  # W&B names an offline run's directory by the second it started
    second = Tracker(paths, report_to, {"lr": 1e-3, "model": {"layers": 2}}, resume_step=3, name="out")
    for step in range(4, 9):
        second.log(step=step, loss=20.0 + step, tokens=100 * step)
        if step == 6:
            second.log(step=step, heldout_loss=5.0)
    second.close()
    return paths


def test_tensorboard_resume_shows_each_step_once_and_the_last_write(tmp_path):
    pytest.importorskip("tensorboard")
    paths = run_twice(tmp_path, ("jsonl", "tensorboard"))
    scalars = tensorboard_scalars(paths.tensorboard)
    assert scalars["loss"] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0), (7, 27.0), (8, 28.0)]
    assert [s for s, _ in scalars["tokens"]] == list(range(1, 9))
    assert scalars["heldout_loss"] == [(6, 5.0)]
    assert {r["step"]: r["loss"] for r in jsonl(paths.jsonl) if "loss" in r} == dict(scalars["loss"])
    assert len(list(paths.tensorboard.glob("events.out.tfevents.*"))) == 2  # one directory, a file per process
    assert tensorboard_hparams(paths.tensorboard) == {"lr": 1e-3, "model/layers": 2.0}


def test_wandb_resume_continues_the_run_with_each_step_once(tmp_path):
    pytest.importorskip("wandb")
    paths = run_twice(tmp_path, ("jsonl", "wandb"))
    run_id = paths.wandb_run.read_text().strip()
    per_file, config = wandb_history(paths.wandb_dir, run_id)
    assert len(per_file) == 2  # the same id from both processes
    # the first process wrote 1…6; the resumed one sent the log's 1…3 again (offline W&B cannot say what
    # it holds) and went on from 4; the eval record joined step 6's row
    assert [[r["_step"] for r in rows] for rows in per_file] == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8]]
    rows = last_write_wins(per_file)
    assert [rows[s]["loss"] for s in range(1, 9)] == [11.0, 12.0, 13.0, 24.0, 25.0, 26.0, 27.0, 28.0]
    assert rows[6]["heldout_loss"] == 5.0 and [s for s in rows if "heldout_loss" in rows[s]] == [6]
    assert config["lr"] == 1e-3 and config["model"] == {"layers": 2}
    fresh = Tracker(paths, ("wandb",), {}, resume_step=None, name="out")  # a fresh run: a new W&B run
    fresh.close()
    assert paths.wandb_run.read_text().strip() != run_id


def test_beside_an_output_file_and_array_parts(tmp_path):
    paths = TrackerPaths.beside(tmp_path / "eval" / "student.json")
    assert (paths.jsonl, paths.tensorboard, paths.wandb_run) == (
        tmp_path / "eval" / "student.metrics.jsonl", tmp_path / "eval" / "tensorboard" / "student",
        tmp_path / "eval" / "student.wandb-run-id")
    part = TrackerPaths.in_dir(tmp_path, "part-00002")
    assert (part.jsonl.name, part.tensorboard.name, part.wandb_run.name) == (
        "metrics.part-00002.jsonl", "part-00002", "wandb-run-id.part-00002")
