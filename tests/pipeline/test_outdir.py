"""pipeline/outdir.py: what counts as distill's in an output directory, and --overwrite deleting only that."""

import json
import os

import pytest

from pipeline import outdir
from pipeline.errors import DistillError
from tests.conftest import tree_digest


def resolved(path, stage="PrepareConfig"):
    """A resolved config as save_resolved writes it: what marks a directory as distill's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stage": stage, "config": {"out": str(path.parent)}}))
    return path


def store(root):
    """A store's names: config, index, a zarr shard (a directory), an arrow shard, a partial index,
    the job lock and a killed writer's temp shard."""
    resolved(root / "config.json")
    (root / "index.json").write_text(json.dumps({"params": {}, "shards": []}))
    (root / "shard-00000.zarr" / "c").mkdir(parents=True)
    (root / "shard-00000.zarr" / "c" / "0").write_bytes(b"zarr")
    (root / "shard-00001.arrow").write_bytes(b"arrow")
    (root / "index.part-00000-of-00002.json").write_text("{}")
    (root / ".lock.part-00000-of-00002").write_text("pid 1")
    (root / ".shard-00002.zarr.tmp-4242").mkdir()
    return root


def foreign(root):
    """What a user keeps in a directory: a file, a source tree, a dotfile directory."""
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (root / "thesis.tex").write_text("\\documentclass{article}\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


def test_missing_and_empty_hold_nothing_and_a_store_is_ours(tmp_path):
    assert outdir.claim(tmp_path / "missing", outdir.STORE) is False
    (tmp_path / "empty").mkdir()
    assert outdir.claim(tmp_path / "empty", outdir.STORE) is False
    assert outdir.claim(store(tmp_path / "s"), outdir.STORE, overwrite=True) is True
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / ".lock.part-00000-of-00001").write_text("")
    assert outdir.claim(locked, outdir.STORE) is False  # a lock and temps alone: nothing to replace


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_files_are_named_in_one_line_and_overwrite_is_not_suggested(tmp_path, overwrite):
    out = foreign(store(tmp_path / "s"))
    with pytest.raises(DistillError, match=r"holds src, thesis.tex and \.git, which distill did not write"):
        outdir.claim(out, outdir.STORE, overwrite)
    (out / "notes.md").write_text("mine")
    with pytest.raises(DistillError) as refused:
        outdir.claim(out, outdir.STORE, overwrite)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{out} holds notes.md, src and 2 more, which distill did not write" in message
    assert ("--overwrite replaces only a store distill wrote" in message) == overwrite
    assert "pass --overwrite" not in message


def test_a_dotfile_alone_is_not_empty(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".bashrc").write_text("alias ll='ls -l'\n")
    with pytest.raises(DistillError, match=r"holds \.bashrc, which distill did not write"):
        outdir.claim(tmp_path / "out", outdir.STORE)


def test_a_link_is_never_ours_even_under_our_name(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "canary").write_text("user data")
    os.symlink(tmp_path / "canary", out / ".lock.part-00000-of-00001")
    with pytest.raises(DistillError, match=r"holds \.lock\.part-00000-of-00001 \(a symbolic link\)"):
        outdir.claim(out, outdir.STORE, overwrite=True)
    (out / ".lock.part-00000-of-00001").unlink()
    os.symlink(tmp_path, out / "shard-00000.zarr")
    with pytest.raises(DistillError, match=r"shard-00000\.zarr \(a symbolic link\)"):
        outdir.claim(out, outdir.STORE, overwrite=True)


def test_our_names_without_distills_own_json_are_not_ours(tmp_path):
    """A Hugging Face tokenizer someone downloaded has the names distill tokenizer writes, but no
    distill_config.json: it is not distill's to replace. A config.json that is not a resolved
    config does not mark a store either."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text("{}")
    (hf / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DistillError, match="holds tokenizer.json and tokenizer_config.json, which distill did not write"):
        outdir.claim(hf, outdir.TOKENIZER, overwrite=True)
    resolved(hf / "distill_config.json", "TokenizerConfig")
    assert outdir.claim(hf, outdir.TOKENIZER, overwrite=True) is True
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(DistillError, match="holds config.json, which distill did not write"):
        outdir.claim(model, outdir.STORE, overwrite=True)


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes").write_text("x")
    with pytest.raises(DistillError, match="is a file, not a directory; choose another --out"):
        outdir.claim(tmp_path / "notes", outdir.TOKENIZER, overwrite=True)


def test_layouts_nest_a_run_and_generated_records(tmp_path):
    run = tmp_path / "run"
    resolved(run / "config.json", "TrainConfig")
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / ".step-00000004.tmp-77").mkdir()
    (run / "model").mkdir()
    (run / ".model.tmp").mkdir()
    assert outdir.claim(run, outdir.RUN) is True
    (run / "checkpoints" / "best").mkdir()
    with pytest.raises(DistillError, match="holds checkpoints/best, which distill did not write"):
        outdir.claim(run, outdir.RUN)
    gen = tmp_path / "gen"
    resolved(gen / "config.job-00000-of-00001.json", "GenerateConfig")
    (gen / "parts").mkdir()
    (gen / "parts" / "job-00000-of-00001.part-00000").write_text("{}\n")
    (gen / "parts" / ".lock.part-00000-of-00001").write_text("")
    assert outdir.claim(gen, outdir.GENERATED) is True
    (gen / "parts" / "notes.txt").write_text("mine")
    with pytest.raises(DistillError, match="holds parts/notes.txt"):
        outdir.claim(gen, outdir.GENERATED)


def test_clear_removes_only_ours_keeps_the_lock_and_refuses_what_appeared(tmp_path):
    out = store(tmp_path / "s")
    lock = out / ".lock.part-00000-of-00002"
    outdir.clear(out, outdir.STORE, keep=(lock,))
    assert [p.name for p in out.iterdir()] == [lock.name]
    out = store(tmp_path / "t")
    (out / "thesis.tex").write_text("mine")  # put there after the stage checked OUT, before it deleted
    before = tree_digest(out)
    with pytest.raises(DistillError, match="holds thesis.tex"):
        outdir.clear(out, outdir.STORE)
    assert tree_digest(out) == before


def test_remove_entry_never_follows_a_link(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep").write_text("user data")
    os.symlink(tmp_path / "data", tmp_path / "link")
    outdir.remove_entry(tmp_path / "link")
    assert not os.path.lexists(tmp_path / "link") and (tmp_path / "data" / "keep").read_text() == "user data"
    (tmp_path / "tree").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "tree" / "inner")
    outdir.remove_entry(tmp_path / "tree")
    assert not (tmp_path / "tree").exists() and (tmp_path / "data" / "keep").read_text() == "user data"
    outdir.remove_entry(tmp_path / "gone")  # already gone: nothing to do
