"""The embedded default in data/: every config parses, the split is by document, the tokenizer loads."""

import gzip
import json

import pytest
from transformers import AutoTokenizer

from pipeline.config import load_config
from pipeline.models import hf_config
from stages.student import TrainConfig
from tests.conftest import ROOT, TOKENIZER

DATA = ROOT / "data"


# the vocabulary each shipped config is for: the project's tokenizer, or the real teacher's (make demo-real)
VOCABULARIES = {"student-smollm2.json": 49152}


@pytest.mark.parametrize("path", sorted((DATA / "models").glob("*.json")), ids=lambda p: p.name)
def test_model_configs_parse(path):
    config = hf_config(path)
    assert config.vocab_size == VOCABULARIES.get(path.name, 8192) and config.max_position_embeddings >= 256


def test_the_real_students_config_is_the_demo_student_at_the_real_teachers_vocabulary():
    real, demo = (hf_config(DATA / "models" / name).to_dict() for name in ("student-smollm2.json", "student.json"))
    manifest = json.loads((DATA / "manifests" / "smollm2-135m.json").read_text())
    assert real["vocab_size"] == manifest["vocab_size"]
    differ = {k for k in real.keys() | demo.keys() if real.get(k) != demo.get(k)}
    assert differ == {"vocab_size", "bos_token_id", "eos_token_id"}  # SmolLM2's <|im_start|> = 1, <|im_end|> = 2


def test_student_is_about_four_times_smaller():
    from transformers import AutoModelForCausalLM

    sizes = {}
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_config(hf_config(DATA / "models" / f"{name}.json"))
        sizes[name] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert 6e6 <= sizes["teacher"] <= 12e6
    assert 3 <= sizes["teacher"] / sizes["student"] <= 5


@pytest.mark.parametrize("path", sorted((DATA / "configs").glob("*-train.yaml")), ids=lambda p: p.name)
def test_stage_configs_parse(path):
    config = load_config(TrainConfig, path)
    assert config.train_store and config.out


def test_the_slurm_demo_config_parses():
    from stages.slurm import SlurmConfig, resolve

    plan = resolve(load_config(SlurmConfig, DATA / "configs" / "slurm-demo.yaml", out="x"))
    assert plan.resources["teacher"]["array"] == 4 and plan.student.train_store == plan.teacher.out


def read_split(name):
    with gzip.open(DATA / "corpus" / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_split_is_by_document_without_overlap():
    train, heldout = read_split("train"), read_split("heldout")
    assert len(heldout) > 300 and len(train) > 20 * len(heldout)
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert {r["source"] for r in heldout} == {r["source"] for r in train}


def test_tokenizer_loads_offline_with_plain_transformers():
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    assert len(tokenizer) == 8192 and tokenizer.eos_token == "<|endoftext|>"
    text = "Blessed is the man that walketh not in the counsel of the ungodly."
    assert tokenizer.decode(tokenizer.encode(text)) == text
