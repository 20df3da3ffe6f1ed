from pathlib import Path

import pytest

from tests.conftest import TOKENIZER, run_cli, write_corpus


def make_student_stores(root: Path, corpus: Path) -> Path:
    """``train`` and ``heldout`` tokens stores of ``corpus`` (64-token rows) under ``root``."""
    for name in ("train", "heldout"):
        result = run_cli("prepare", "--input", corpus, "--out", root / name, "--tokenizer", TOKENIZER,
                         "--seq-len", "64", "--rows-per-shard", "100")
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def student_stores(tmp_path, small_corpus):
    """``train`` and ``heldout`` tokens stores of the 60-document corpus (64-token rows): what stage two
    trains on here, and stage one reads."""
    return make_student_stores(tmp_path, small_corpus)


@pytest.fixture(scope="module")
def module_student_stores(tmp_path_factory, heldout_docs):
    """The same stores, made once for a module whose tests only read them (each writes its runs to a
    directory of its own name beside them)."""
    root = tmp_path_factory.mktemp("student-stores")
    return make_student_stores(root, write_corpus(root / "corpus.jsonl", heldout_docs[:60]))
