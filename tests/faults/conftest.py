import pytest

from tests.conftest import TOKENIZER, run_cli


@pytest.fixture
def student_stores(tmp_path, small_corpus):
    """``train`` and ``heldout`` tokens stores of the 60-document corpus (64-token rows): what stage two
    trains on here, and stage one reads."""
    for name in ("train", "heldout"):
        result = run_cli("prepare", "--input", small_corpus, "--out", tmp_path / name, "--tokenizer", TOKENIZER,
                         "--seq-len", "64", "--rows-per-shard", "100")
        assert result.exit_code == 0, result.output
    return tmp_path
