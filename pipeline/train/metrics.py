"""Metrics as JSON lines, one object per event, appended and flushed as they happen."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_text


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            # Lines past the checkpoint were logged by the run that died; the resumed run redoes them,
            # and so does it the final evaluation (logged after the last checkpoint, marked final).
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines
                    if (r := json.loads(line)).get("step", 0) <= resume_step and not r.get("final")]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")

    def log(self, **record: Any) -> None:
        clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
