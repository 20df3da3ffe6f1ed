"""Hugging Face Hub ids (``org/name``) for ``--teacher``, ``--model``, ``--tokenizer``: resolved to the
snapshot in the local Hugging Face cache (``$HF_HOME/hub``), online or offline, never downloaded.

A cluster job that downloads gigabytes of weights after queueing for hours, on every task of an
array, is the failure this avoids: fetching is one explicit command before the run
(``huggingface-cli download org/name``), and every stage after it reads the same local files. An id
whose snapshot is not in the cache is one line saying that command. A path that exists is always a
path, so a local directory named like an id (``runs/teacher``) is never taken for one.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from pipeline.errors import DistillError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
# the stage options that name a model or a tokenizer to read (a run name or an output is never one)
MODEL_FIELDS = ("teacher", "model", "tokenizer", "init_teacher", "student")


def is_hub_id(spec: str) -> bool:
    return bool(spec) and HUB_ID.match(spec) is not None and not spec.endswith((".json", ".yaml", ".yml"))


def local_path(spec: str, option: str = "--model") -> str:
    """``spec`` itself when it is a path that exists (or not an id); else the local cache's snapshot of
    the Hub id ``spec`` (its ``main`` revision), or a one-line error saying how to fetch it."""
    if not is_hub_id(spec) or Path(spec).exists():
        return spec
    from huggingface_hub import constants, snapshot_download

    # read at the call, not at huggingface_hub's import: a job (or a test) may set HF_HOME after it
    cache = (os.environ.get("HF_HUB_CACHE") or (os.environ.get("HF_HOME") and str(Path(os.environ["HF_HOME"]) / "hub"))
             or constants.HF_HUB_CACHE)
    try:
        return snapshot_download(spec, local_files_only=True, cache_dir=cache)
    except Exception:  # not cached (LocalEntryNotFoundError), or a cache entry without that revision
        raise DistillError(f"{option} {spec} is no local path, and the Hugging Face cache ({cache}) holds no snapshot "
                           f"of it; fetch it first with `huggingface-cli download {spec}` (HF_HOME sets where it "
                           "goes), or pass a local directory") from None


def resolve_model_paths(config: Any) -> Any:
    """``config`` with each model or tokenizer option that names a Hub id replaced by its local
    snapshot (what the run records in its resolved config and stores)."""
    from pipeline.config import flag

    if not dataclasses.is_dataclass(config):
        return config
    names = {f.name for f in dataclasses.fields(config)}
    changes = {name: local_path(value, flag(name)) for name in MODEL_FIELDS
               if name in names and isinstance(value := getattr(config, name), str) and is_hub_id(value)}
    changes = {k: v for k, v in changes.items() if v != getattr(config, k)}
    return dataclasses.replace(config, **changes) if changes else config
