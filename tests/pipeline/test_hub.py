"""Hub ids (``org/name``) for models and tokenizers resolve to the local Hugging Face cache's snapshot,
never downloaded; one that is not cached is one line saying how to fetch it."""

import json
import shutil

import pytest

from pipeline.errors import DistillError
from pipeline.hub import is_hub_id, local_path
from tests.conftest import TOKENIZER, make_teacher, one_line_error, run_cli, write_corpus

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """A Hugging Face cache holding ``tiny-org/tiny-lm`` (a tiny Llama and the project's tokenizer) at
    ``main``, laid out as ``huggingface-cli download`` leaves it."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--tiny-org--tiny-lm"
    snapshot = repo / "snapshots" / COMMIT
    make_teacher(snapshot)
    for path in TOKENIZER.iterdir():
        shutil.copy(path, snapshot / path.name)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_ids_resolve_to_the_cached_snapshot_and_paths_stay_paths(hf_home, tmp_path, monkeypatch):
    assert local_path("tiny-org/tiny-lm") == str(hf_home)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "teacher").mkdir(parents=True)
    assert local_path("runs/teacher") == "runs/teacher"  # an existing directory is never taken for an id
    assert not is_hub_id("data/models/teacher") and not is_hub_id("configs/student.json")
    with pytest.raises(DistillError, match=r"--tokenizer other-org/absent is no local path, and the Hugging Face cache "
                                           r"\(.*hf/hub\) holds no snapshot of it; fetch it first with "
                                           r"`huggingface-cli download other-org/absent`"):
        local_path("other-org/absent", "--tokenizer")


def test_prepare_and_stage_one_read_a_cached_id(hf_home, tmp_path, heldout_docs):
    corpus = write_corpus(tmp_path / "c.jsonl", heldout_docs[:20])
    result = run_cli("prepare", "--input", corpus, "--tokenizer", "tiny-org/tiny-lm", "--out", tmp_path / "tokens",
                     "--seq-len", "32", "--rows-per-shard", "16", "--chunk-rows", "8")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "tokens" / "index.json").read_text())
    assert index["params"]["tokenizer"] == str(hf_home)  # the resolved snapshot, which later stages load
    result = run_cli("teacher", "--tokens-store", tmp_path / "tokens", "--teacher", "tiny-org/tiny-lm",
                     "--out", tmp_path / "store", "--max-rows", "4", "--kind", "sampled", "--samples", "4")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "store" / "config.part-00000.json").read_text())["config"]
    assert config["teacher"] == str(hf_home)


def test_an_id_not_in_the_cache_is_one_line_and_writes_nothing(hf_home, tmp_path, heldout_docs):
    corpus = write_corpus(tmp_path / "c.jsonl", heldout_docs[:5])
    line = one_line_error(run_cli("prepare", "--input", corpus, "--tokenizer", "other-org/absent", "--out",
                                  tmp_path / "tokens"))
    assert "huggingface-cli download other-org/absent" in line
    line = one_line_error(run_cli("eval", "--model", "other-org/absent", "--out", tmp_path / "e.json",
                                  "--tasks", "heldout"))
    assert "--model other-org/absent is no local path" in line
    assert not (tmp_path / "tokens").exists() and not (tmp_path / "e.json").exists()
