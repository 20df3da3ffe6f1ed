"""A tokenizer directory with its own code (an ``auto_map``) runs none of it unless the user says so."""

import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import DistillError
from pipeline.text.tokenizer import load_tokenizer
from tests.conftest import TOKENIZER, one_line_error, run_cli

MODULE = '''
import os
from pathlib import Path
from transformers import PreTrainedTokenizerFast

Path(os.environ["CANARY"]).write_text("custom tokenizer code ran")


class CanaryTokenizerFast(PreTrainedTokenizerFast):
    pass
'''


def custom_tokenizer(path: Path) -> Path:
    shutil.copytree(TOKENIZER, path)
    (path / "tokenization_canary.py").write_text(MODULE)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_canary.CanaryTokenizerFast"]}
    config["tokenizer_class"] = "CanaryTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def canary(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CANARY", str(tmp_path / "canary"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    return tmp_path / "canary"


def test_custom_code_is_refused_without_trust(tmp_path, canary):
    path = custom_tokenizer(tmp_path / "tok")
    with pytest.raises(DistillError, match="runs its own code .*tokenization_canary.CanaryTokenizerFast.*"
                                           "--trust-remote-code") as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)
    assert not canary.exists()


def test_custom_code_runs_when_trusted(tmp_path, canary):
    # each test its own directory name: transformers imports a directory's code once per process, by name
    tokenizer = load_tokenizer(custom_tokenizer(tmp_path / "tok_trusted"), trust_remote_code=True)
    assert type(tokenizer).__name__ == "CanaryTokenizerFast"
    assert canary.read_text() == "custom tokenizer code ran"
    plain = load_tokenizer(TOKENIZER)
    assert tokenizer.encode("the same ids") == plain.encode("the same ids")


def test_prepare_refuses_a_custom_tokenizer_in_one_line(tmp_path, canary):
    path = custom_tokenizer(tmp_path / "tok_prepare")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "a few words, " * 20}) + "\n")
    out = tmp_path / "store"
    error = one_line_error(run_cli("prepare", "--input", corpus, "--tokenizer", path, "--out", out, "--seq-len", 8))
    assert "--trust-remote-code" in error
    assert not out.exists() and not canary.exists()
    run_cli("prepare", "--input", corpus, "--tokenizer", path, "--out", out, "--seq-len", 8, "--trust-remote-code")
    assert canary.exists() and (out / "index.json").is_file()
