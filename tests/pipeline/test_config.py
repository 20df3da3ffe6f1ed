import json

import pytest

from pipeline.config import load_config
from pipeline.errors import DistillError
from stages.prepare import PrepareConfig
from stages.student import TrainConfig


def test_precedence_defaults_file_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_store: s\nout: o\nlr: 0.01\nmax_steps: 7\n")
    config = load_config(TrainConfig, path, max_steps=9)
    assert (config.lr, config.max_steps, config.micro_batch_size) == (0.01, 9, 16)


def test_unknown_keys_are_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train_store": "s", "out": "o", "learning_rate": 1, "max_step": 3}))
    with pytest.raises(DistillError) as e:
        load_config(TrainConfig, path)
    # each unknown key with the closest known one, where there is one; the known keys where there is not
    assert "unknown keys learning_rate, max_step (did you mean 'max_steps'?); rename or remove them" in str(e.value)
    assert "known keys: train_store, eval_store" in str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(DistillError) as e:
        load_config(PrepareConfig, inputs=("x",), out="o", seq_len=1, backend="parquet")
    assert "seq_len" in str(e.value) and "backend" in str(e.value)


def test_types_are_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_store: s\nout: o\nmax_steps: many\n")
    with pytest.raises(DistillError, match="max_steps' must be int"):
        load_config(TrainConfig, path)
