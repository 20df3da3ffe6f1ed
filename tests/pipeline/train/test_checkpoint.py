"""pipeline/train/checkpoint.py: the manifest written with each checkpoint, and what resolve() makes of
damaged, partial and pre-manifest checkpoints."""

import json

import pytest
import torch

from pipeline.errors import DistillError
from pipeline.train import checkpoint


@pytest.fixture
def root(tmp_path):
    """Checkpoints at steps 1, 2 and 3 of a small state."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        checkpoint.save(root, step, {"w": torch.arange(100.0) * step, "step": step}, {"n": step}, keep=3)
    return root


def test_the_manifest_lists_every_file_with_its_size_and_sha256(root):
    from pipeline.io import file_sha256

    path = root / "step-00000003"
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    assert manifest["version"] == 1 and manifest["step"] == 3
    assert manifest["files"] == {name: {"bytes": (path / name).stat().st_size, "sha256": file_sha256(path / name)}
                                 for name in ("config.json", "state.pt")}
    state, config = checkpoint.load(path)
    assert torch.equal(state["w"], torch.arange(100.0) * 3) and config == {"n": 3}


@pytest.mark.parametrize("damage,why", [
    (lambda p: (p / "config.json").write_text((p / "config.json").read_text().replace("3", "4")),
     "config.json does not match its sha256 in manifest.json"),
    (lambda p: (p / "state.pt").unlink(), "state.pt is missing"),
    (lambda p: (p / "config.json").unlink(), "config.json is missing"),
    (lambda p: (p / checkpoint.MANIFEST).write_text("{"), "manifest.json does not parse"),
])
def test_auto_passes_over_a_damaged_newest_checkpoint(root, damage, why):
    damage(root / "step-00000003")
    said = []
    assert checkpoint.resolve(root, "auto", said.append) == root / "step-00000002"
    assert len(said) == 1 and said[0].startswith(f"warning: skipping damaged checkpoint {root / 'step-00000003'} "
                                                 f"({why}") and said[0].endswith("; resuming from step-00000002 instead")
    with pytest.raises(DistillError, match="is damaged"):
        checkpoint.load(root / "step-00000003")


def test_with_every_checkpoint_damaged_auto_starts_over_and_says_so_in_one_line(root):
    for step in (1, 2, 3):
        state_pt = root / f"step-{step:08d}" / "state.pt"
        state_pt.write_bytes(state_pt.read_bytes()[:-1])
    said = []
    assert checkpoint.resolve(root, "auto", said.append) is None
    assert len(said) == 1 and said[0].count("(state.pt is ") == 3
    assert said[0].endswith("no intact checkpoint is left, starting from step 0")


def test_an_explicit_damaged_checkpoint_is_refused_and_a_pre_manifest_one_warned_about(root):
    path = root / "step-00000002"
    data = bytearray((path / "state.pt").read_bytes())
    data[-100] ^= 1
    (path / "state.pt").write_bytes(bytes(data))
    with pytest.raises(DistillError, match=r"^--resume .*step-00000002: the checkpoint is damaged \(state.pt does not "
                                           r"match its sha256"):
        checkpoint.resolve(root, str(path))
    (root / "step-00000001" / checkpoint.MANIFEST).unlink()
    said = []
    assert checkpoint.resolve(root, str(root / "step-00000001"), said.append) == root / "step-00000001"
    assert said == [f"warning: checkpoint {root / 'step-00000001'} has no manifest.json (written before checkpoints "
                    "carried checksums): loading it unchecked"]
    assert checkpoint.load(root / "step-00000001")[1] == {"n": 1}


@pytest.mark.parametrize("name", ["../../secret", "/etc/hostname", "sub/state.pt", ""])
def test_a_manifest_naming_a_file_outside_its_checkpoint_is_damaged(root, tmp_path, name):
    """Names read off disk stay inside the checkpoint, as a store's shard names do (contract.safe_child):
    a manifest listing another path is a damaged checkpoint, and nothing outside is read."""
    path = root / "step-00000003"
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.problem(path) == f"manifest.json lists {name!r}, which is not a file name in the checkpoint " \
                                       "(damaged or hostile)"
    assert checkpoint.resolve(root, "auto", say=lambda line: None) == root / "step-00000002"
