"""Metrics as JSON lines, one object per event, appended and flushed as they happen.

This log is the record of a run (``metrics.jsonl``); TensorBoard and W&B, when asked for
(:mod:`pipeline.tracking`), get the same records and follow its resume rule: what the log keeps after
a resume is what they show.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_text


# numbers of the machine and the moment, not of the computation: two runs of the same steps (a resumed one and
# an uninterrupted one) log the same records less these
MACHINE_SCALARS = ("tokens_per_s", "step_s", "model_tflops_per_s", "mfu", "peak_rss_gib", "peak_gpu_memory_gib")


class MetricsLog:
    """``path`` as JSON lines. ``resume_step`` None starts it empty; an int keeps the lines of steps up
    to it (:attr:`kept`, as records) and drops the rest."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.kept: list[dict[str, Any]] = []
        self.dropped = 0  # lines of the run that died, past the checkpoint
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            # Lines past the checkpoint were logged by the run that died; the resumed run redoes them,
            # and so does it the final evaluation (logged after the last checkpoint, marked final).
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines
                    if (r := json.loads(line)).get("step", 0) <= resume_step and not r.get("final")]
            self.dropped = len(lines) - len(kept)
            self.kept = [json.loads(line) for line in kept]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")

    def log(self, **record: Any) -> None:
        self._file.write(json.dumps(rounded(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed


def rounded(record: dict[str, Any]) -> dict[str, Any]:
    """Finite floats to 6 decimals, as the log writes them."""
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}


def token_byte_lengths(tokenizer) -> Any:
    """UTF-8 bytes each token id spells (``[V]`` int64 tensor; special tokens 0): the denominator of
    bits per byte over stored token rows, where the text itself is not at hand."""
    import torch

    from pipeline.text.align import token_bytes

    pieces = token_bytes(tokenizer).pieces
    return torch.tensor([len(p) if p else 0 for p in pieces], dtype=torch.int64)


def bits_per_byte(loss_nats_sum: float, target_bytes: int) -> float:
    """Summed next-token loss (nats) over the bytes its targets spell, in bits per byte."""
    return loss_nats_sum / math.log(2) / max(target_bytes, 1)


def target_bytes(input_ids, loss_mask, byte_lengths) -> int:
    """Bytes spelt by the targets a next-token loss scores in ``input_ids`` ``[B, L]``: tokens 1…L−1,
    those whose ``loss_mask`` ``[B, L]`` (None: all) is 1 at the position predicting them."""
    import torch

    ids = torch.as_tensor(input_ids)[:, 1:].long().cpu()
    lengths = byte_lengths[ids]
    if loss_mask is not None:
        lengths = lengths * torch.as_tensor(loss_mask)[:, :-1].cpu().long()
    return int(lengths.sum())
