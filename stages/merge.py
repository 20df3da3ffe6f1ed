"""``distill merge``: after the stage-one (or prepare) tasks have each written their partial index,
check that together they cover every shard and write the store's ``index.json``. It only reads
indexes and shards' checksums, so it imports neither torch nor transformers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import check, option
from pipeline.store import contract as store_lib


@dataclass(frozen=True)
class MergeConfig:
    store: str = option("", "The store directory whose partial indexes to merge: a stage-one store, or a tokens "
                        "store that distill prepare tasks (--num-shards) filled.")

    def __post_init__(self):
        check([] if self.store else ["no --store given"], "merge")


def merge(config: MergeConfig) -> Path:
    from stages.prepare import building_tokens, merge_tokens

    root = Path(config.store)
    if root.is_dir() and building_tokens(root):  # prepare tasks' stream pieces: rows are cut here
        return merge_tokens(root)
    return store_lib.merge_partial_indexes(root)
