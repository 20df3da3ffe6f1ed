import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer"
HELDOUT = ROOT / "data" / "corpus" / "heldout.jsonl.gz"


@pytest.fixture(scope="session")
def heldout_docs() -> list[str]:
    with gzip.open(HELDOUT, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture
def small_corpus(tmp_path, heldout_docs) -> Path:
    """A real-text JSONL corpus of 60 held-out documents (about 18k tokens)."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in heldout_docs[:60]))
    return path


@pytest.fixture
def tiny_model_config(tmp_path) -> Path:
    """A Llama of ~0.3M parameters at the project's vocabulary: fast enough for loop tests on CPU."""
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({
        "model_type": "llama", "vocab_size": 8192, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
    }))
    return path


def run_cli(*args: str):
    """Run ``distill ARGS`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from stages.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])
