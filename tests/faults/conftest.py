from pathlib import Path

import pytest

from tests.conftest import TOKENIZER, run_cli, write_corpus


def make_student_stores(root: Path, docs: list[str]) -> Path:
    """Under ``root``, a ``train`` tokens store of ``docs`` (64-token rows; 639 rows for the first 60
    held-out documents) and a ``heldout`` one of the first 6 of them (55 rows: more than the 32 a
    periodic evaluation reads, few enough that each run's final evaluation, over all of them, is short)."""
    for name, part in (("train", docs), ("heldout", docs[:6])):
        corpus = write_corpus(root / f"{name}.jsonl", part)
        result = run_cli("prepare", "--input", corpus, "--out", root / name, "--tokenizer", TOKENIZER,
                         "--seq-len", "64", "--rows-per-shard", "100")
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def student_stores(tmp_path, heldout_docs):
    """``train`` and ``heldout`` tokens stores of the 60-document corpus (64-token rows): what stage two
    trains on here, and stage one reads."""
    return make_student_stores(tmp_path, heldout_docs[:60])


@pytest.fixture(scope="module")
def module_student_stores(tmp_path_factory, heldout_docs):
    """The same stores, made once for a module whose tests only read them (each writes its runs to a
    directory of its own name beside them)."""
    return make_student_stores(tmp_path_factory.mktemp("student-stores"), heldout_docs[:60])
