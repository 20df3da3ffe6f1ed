"""Experiment tracking: one record per event, fanned out to the sinks a run asked for (``--report-to``).

``jsonl`` (the run's ``metrics.jsonl``, :class:`pipeline.train.metrics.MetricsLog`) is always on and is
the record of the run; ``tensorboard`` and ``wandb`` are optional (``pip install 'distill[tracking]'``)
and get the same records' numbers. A :class:`Tracker` is made on rank 0 only (other ranks hold None),
flushes each record as it is logged, and is closed when the stage finishes or is pre-empted.

Resume, so that a requeued or ``--resume auto`` run continues the same curves with each step once:

- jsonl: lines past the resumed step are dropped (as before);
- TensorBoard: the same directory, opened with ``purge_step`` = the resumed step, so that the reader
  hides every event of the dead run from that step on; the log's records *at* that step are written
  again, so what TensorBoard shows is what the log keeps (the last write wins);
- W&B: the same run, its id kept in OUT (``wandb-run-id``), opened with ``resume="allow"``. A killed
  process loses what W&B's service had not yet written (offline, everything since the run began), so
  the resumed run sends the log's records again from the first step W&B does not hold (``run.step``:
  the step after the server's last one; 0 offline), then continues. Online, W&B refuses a step below
  the last it holds, so a step the dead run got there past the checkpoint keeps its first value (the
  same number where the resume recomputes it exactly: same device and seed); offline, each process
  writes run files of its own and the last write of a step wins, as ``wandb sync`` replays them.

MFU is the student's model FLOPs over the device's peak: per trained token ``6·N`` (forward and
backward of every matrix, ``N`` the parameters that multiply: all but an untied input embedding,
whose lookup costs nothing) plus ``12·layers·d_model·seq_len`` for attention's score and value
products (PaLM, appendix B; counted over the full square, as the convention is). The distillation
term's own arithmetic (a softmax over the vocabulary per position) is not counted. The peak is
``--peak-tflops`` or, on CUDA, the device's dense bf16 tensor-core peak from :data:`PEAK_TFLOPS`
(whatever dtype the run computes in); on a CPU, or an unknown GPU, MFU is logged only when given.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import DistillError
from pipeline.io import atomic_write_text
from pipeline.train.metrics import MetricsLog, rounded

SINKS = ("jsonl", "tensorboard", "wandb")
PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> the module it needs
REPORT_TO_HELP = ("Where metrics go, comma-separated: jsonl (OUT's metrics.jsonl, always on), tensorboard "
                  "(OUT/tensorboard), wandb (W&B; WANDB_PROJECT, default 'distill'; WANDB_MODE=offline works). "
                  "tensorboard and wandb need pip install 'distill[tracking]'.")
PEAK_TFLOPS_HELP = ("Peak TFLOP/s of one device for the logged MFU (0 = the CUDA device's dense bf16 peak from a "
                    "table of H200/H100/A100/L40S/L4; none on a CPU, where MFU is then not logged).")

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name();
# the first match wins, so the more specific names come first.
PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.05),
               ("L4", 121.0))


# ---------------------------------------------------------------------- options


def report_to_problems(report_to: tuple[str, ...]) -> list[str]:
    """The ``__post_init__`` problems of a ``--report-to`` value."""
    unknown = [s for s in report_to if s not in SINKS]
    return [f"report_to: unknown sink(s) {', '.join(unknown)}; choose from {', '.join(SINKS)}"] if unknown else []


def peak_tflops_problems(peak_tflops: float) -> list[str]:
    return [] if peak_tflops >= 0 else [f"peak_tflops must not be negative, got {peak_tflops}"]


def check_installed(report_to: tuple[str, ...]) -> None:
    """One line naming the extra to install, for a sink whose package is missing."""
    missing = [s for s in report_to if s in PACKAGE and importlib.util.find_spec(PACKAGE[s]) is None]
    if missing:
        raise DistillError(f"--report-to {','.join(missing)} needs {' and '.join(PACKAGE[s] for s in missing)}, "
                           "which is not installed; pip install 'distill[tracking]' (or drop it from --report-to)")


# ---------------------------------------------------------------------- where a run's sinks write


@dataclass(frozen=True)
class TrackerPaths:
    jsonl: Path  # the metrics log
    tensorboard: Path  # a directory of event files
    wandb_run: Path  # the W&B run's id, one line
    wandb_dir: Path  # where W&B's own files go (it makes wandb/ inside)

    @classmethod
    def in_dir(cls, out: Path, part: str = "") -> "TrackerPaths":
        """A run directory's: ``metrics.jsonl``, ``tensorboard/``, ``wandb-run-id``; with ``part`` (a
        stage-one array job, say ``part-00003``) ``metrics.PART.jsonl``, ``tensorboard/PART``,
        ``wandb-run-id.PART``."""
        out = Path(out)
        dot = f".{part}" if part else ""
        return cls(out / f"metrics{dot}.jsonl", out / "tensorboard" / part if part else out / "tensorboard",
                   out / f"wandb-run-id{dot}", out)

    @classmethod
    def beside(cls, out_file: Path) -> "TrackerPaths":
        """Beside a stage's one output file (``distill eval``'s ``X.json``): ``X.metrics.jsonl``,
        ``tensorboard/X``, ``X.wandb-run-id``."""
        out_file = Path(out_file)
        stem = out_file.with_suffix("")
        return cls(stem.with_name(stem.name + ".metrics.jsonl"), out_file.parent / "tensorboard" / stem.name,
                   stem.with_name(stem.name + ".wandb-run-id"), out_file.parent)


# ---------------------------------------------------------------------- the sinks


class Sink(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...
    def close(self, preempted: bool) -> None: ...


class TensorBoardSink:
    """Event files under one directory for the whole run, resumes included."""

    def __init__(self, directory: Path, config: dict[str, Any], purge_step: int,
                 replay: list[tuple[int, dict[str, float]]]):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        directory.mkdir(parents=True, exist_ok=True)
        # purge_step: the reader hides every earlier event at or past it (a SessionLog START there)
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=purge_step, flush_secs=10)
        flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, sort_keys=True)
                for k, v in flatten(config).items() if v is not None}
        for summary in hparams(flat, {}):  # in this directory's own files, not a subdirectory as add_hparams does
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```")
        for step, scalars in replay:
            self.log(step, scalars)
        self.writer.flush()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # a SIGKILL loses nothing logged before it

    def close(self, preempted: bool) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run for the whole run, resumes included: its id in a file in OUT."""

    def __init__(self, id_path: Path, wandb_dir: Path, config: dict[str, Any], fresh: bool, name: str,
                 group: str | None, job_type: str, replay: list[tuple[int, dict[str, float]]]):
        import wandb

        run_id = None if fresh or not id_path.is_file() else id_path.read_text().strip()
        if not run_id:
            run_id = uuid.uuid4().hex[:8]  # W&B ids: lowercase letters and digits
            atomic_write_text(id_path, run_id + "\n")  # before init: a run killed during it keeps the id
        wandb_dir.mkdir(parents=True, exist_ok=True)
        # allow_val_change: a resumed run may change options that do not fix what it computes (--max-steps, …)
        self.run = wandb.init(id=run_id, resume="allow", dir=str(wandb_dir), config=config, allow_val_change=True,
                              name=name, project=os.environ.get("WANDB_PROJECT") or "distill", group=group,
                              job_type=job_type, settings=wandb.Settings(console="off", silent=True))
        self.first_step = self.run.step  # W&B holds the steps below it (online); it refuses them again
        for step, scalars in replay:
            self.log(step, scalars)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step >= self.first_step:
            self.run.log(scalars, step=step)

    def close(self, preempted: bool) -> None:
        if preempted:
            self.run.mark_preempting()
        self.run.finish()


# ---------------------------------------------------------------------- the tracker


class Tracker:
    """The metrics log plus the sinks of ``report_to``; ``log(step=…, **record)`` writes the record to
    the log whole and its finite numbers (``final`` and ``step`` aside) to every sink at ``step``.

    ``resume_step``: None for a fresh run (the log starts empty, TensorBoard hides any older events,
    W&B gets a new run), else the step the run continues from. ``config``: the resolved config and
    facts, the run's hyper-parameters."""

    def __init__(self, paths: TrackerPaths, report_to: tuple[str, ...], config: dict[str, Any], *,
                 resume_step: int | None, name: str, group: str | None = None, job_type: str = ""):
        check_installed(report_to)
        self.paths = paths
        self.metrics = MetricsLog(paths.jsonl, resume_step=resume_step)
        self.sinks: dict[str, Sink] = {}
        self._opened, self._tokens = time.perf_counter(), 0
        self._step_sent: tuple[int, set[str]] = (-1, set())  # the last step and the names sent at it
        try:
            if "tensorboard" in report_to:
                start = resume_step or 0
                replay = [(step, s) for step, s in merged_by_step(self.metrics.kept) if step == start]
                self.sinks["tensorboard"] = TensorBoardSink(paths.tensorboard, config, start, replay)
            if "wandb" in report_to:
                self.sinks["wandb"] = WandbSink(paths.wandb_run, paths.wandb_dir, config, resume_step is None, name,
                                                group, job_type, merged_by_step(self.metrics.kept))
        except BaseException:
            self.close()
            raise

    def log(self, **record: Any) -> None:
        self.metrics.log(**record)
        if self.sinks:
            step, scalars = int(record.get("step", 0)), scalars_of(record)
            # a second record at a step (its evaluation) adds names; one it repeats (tokens) is sent once
            sent = self._step_sent[1] if self._step_sent[0] == step else set()
            scalars = {k: v for k, v in scalars.items() if k not in sent}
            self._step_sent = (step, sent | set(scalars))
            for sink in self.sinks.values():
                sink.log(step, scalars)

    def throughput(self, tokens: int) -> float:
        """Tokens per second since the tracker opened, ``tokens`` more having been done now: a rate
        that a pipelined loop's uneven gaps between records do not make jump."""
        self._tokens += tokens
        return self._tokens / max(time.perf_counter() - self._opened, 1e-9)

    def close(self, preempted: bool = False) -> None:
        if not self.metrics.closed:
            self.metrics.close()
        for sink in self.sinks.values():
            sink.close(preempted)
        self.sinks = {}


def merged_by_step(records: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """The records' scalars merged per step, in step order, each name once a step (its first value)."""
    merged: dict[int, dict[str, float]] = {}
    for record in records:
        at = merged.setdefault(int(record.get("step", 0)), {})
        at |= {k: v for k, v in scalars_of(record).items() if k not in at}
    return sorted((step, scalars) for step, scalars in merged.items() if scalars)


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers for the sinks: finite ints and floats, not ``step`` or flags."""
    return {k: float(v) for k, v in rounded(record).items()
            if k not in ("step", "final") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``a/b`` keys (TensorBoard's hyper-parameters are flat)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}/")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def stage_one_tracker(config, out: Path, params: dict[str, Any], shards_done: int) -> Tracker:
    """A stage-one job's tracker (``config``: a TeacherConfig): its step is the count of shards this job
    has written, so a rerun continues from the shards it finds; an array job (``--num-shards`` > 1)
    writes files of its own (``part-JJJJJ``), one W&B run per job, grouped by the store."""
    from pipeline.config import to_dict

    part = f"part-{config.shard_index:05d}" if config.num_shards > 1 else ""
    hyper = {"stage": "teacher", **to_dict(config), "params": params}
    return Tracker(TrackerPaths.in_dir(out, part), config.report_to, hyper, resume_step=shards_done or None,
                   name=f"{out.name}{'-' + part if part else ''}", group=out.name, job_type="teacher")


# ---------------------------------------------------------------------- what a step costs


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward): ``6·N + 12·layers·d_model·seq_len`` (module
    docstring). ``N``: parameters (tied ones once) less an untied input embedding."""
    unique = {id(p): p for p in model.parameters()}
    n = sum(p.numel() for p in unique.values())
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embedding is not None and (output is None or output.weight is not embedding.weight):
        n -= embedding.weight.numel()
    config = getattr(model, "config", None)
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    width = _first(config, "hidden_size", "n_embd", "d_model")
    return 6.0 * n + 12.0 * layers * width * seq_len


def _first(config, *names: str) -> int:
    for name in names:
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return 0


def default_peak_tflops(device) -> float | None:
    """The dense bf16 peak of a CUDA ``device`` from :data:`PEAK_TFLOPS`; None elsewhere or unknown."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def mfu(model_flops_per_token: float, tokens_per_s: float, peak_tflops: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over ``devices`` × peak; None without a peak."""
    if not peak_tflops:
        return None
    return model_flops_per_token * tokens_per_s / (devices * peak_tflops * 1e12)


@dataclass(frozen=True)
class StepCost:
    """What a training step's scalars need besides the step: FLOPs per token, the peak, the device."""

    flops_per_token: float
    peak_tflops: float | None  # one device's
    devices: int
    device: Any

    @classmethod
    def of(cls, model, seq_len: int, device, peak_tflops: float = 0.0, devices: int = 1) -> "StepCost":
        """``peak_tflops`` 0: the device's (:func:`default_peak_tflops`)."""
        return cls(flops_per_token(model, seq_len), peak_tflops or default_peak_tflops(device), devices, device)

    def scalars(self, tokens_per_s: float) -> dict[str, float]:
        """``mfu`` (where a peak is known), ``model_tflops_per_s`` and the peak memory."""
        achieved = self.flops_per_token * tokens_per_s
        out = {"model_tflops_per_s": achieved / 1e12}
        if (utilisation := mfu(self.flops_per_token, tokens_per_s, self.peak_tflops, self.devices)) is not None:
            out["mfu"] = utilisation
        return out | peak_memory(self.device)


def teacher_signal_scalars(distilling: bool, temperature: float, record: dict[str, Any],
                           cross_positions: str = "starts") -> dict[str, float]:
    """The teacher signal a logged step trained on: ``teacher_temperature`` (T) and
    ``teacher_signal_share``, the share of its target positions the divergence term reached (every
    one from a store of the student's tokenizer, or online; across tokenizers the positions the
    next-token term compares, from ``record``'s ``cross_*_share``; 0 when training on CE alone).
    The store's kind is a hyper-parameter (``store_kind``), not a number."""
    if not distilling:
        return {"teacher_signal_share": 0.0}
    if "cross_start_share" in record:
        share = record["cross_start_share"] if cross_positions == "starts" else record["cross_exact_share"]
    else:
        share = 1.0
    return {"teacher_temperature": temperature, "teacher_signal_share": share}


def peak_memory(device) -> dict[str, float]:
    """``peak_gpu_memory_gib`` (CUDA's max allocated) on a CUDA device, else ``peak_rss_gib`` (the
    process's maximum resident set)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return {"peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_rss_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}
