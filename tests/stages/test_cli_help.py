"""Every command's --help shows each option's default (the field's: the option itself is unset, so
that a config file's value can stand)."""

import dataclasses
import importlib
import re

import pytest
from typer.testing import CliRunner

from pipeline.config import field_types, flag
from stages.cli import app

CONFIGS = {"prepare": "stages.prepare.PrepareConfig", "teacher": "stages.teacher.TeacherConfig",
           "student": "stages.student.TrainConfig", "eval": "stages.eval.EvalConfig",
           "generate": "stages.generate.GenerateConfig", "rounds": "stages.rounds.RoundsConfig",
           "slurm": "stages.slurm.SlurmConfig", "plan": "stages.plan.PlanConfig"}


@pytest.mark.parametrize("name", CONFIGS)
def test_help_shows_every_default(name):
    module, _, attr = CONFIGS[name].rpartition(".")
    config = getattr(importlib.import_module(module), attr)
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    types = field_types(config)
    checked = 0
    for field in dataclasses.fields(config):
        if field.metadata.get("file_only") or field.default in ("", None, ()):
            continue
        if types[field.name] is bool:
            shown = flag(field.name) if field.default else f"--no-{flag(field.name)[2:]}"
        else:
            shown = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else str(field.default)
        assert f"[default: {shown}]" in text, (field.name, shown)
        checked += 1
    assert checked >= 2
    assert not re.search(r"\[default: \(", text)  # shown plainly, not typer's "(text)" form


def test_the_light_commands_start_without_torch(tmp_path):
    """`merge`, `status`, `inspect`, `report` and `slurm` read indexes and files: a stage's module is
    imported only when its command runs, so these start in a fraction of a second, without torch or
    transformers (a SLURM merge job, `distill status` of a store or a student run in a loop; `slurm`
    itself imports the stages' configs when it writes scripts). Checked in a fresh interpreter."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = """if True:
        import sys
        from typer.testing import CliRunner
        from stages.cli import app
        for command in ("merge", "status", "inspect", "report", "slurm"):
            result = CliRunner().invoke(app, [command, "--help"])
            assert result.exit_code == 0, result.output
        result = CliRunner().invoke(app, ["status", sys.argv[1]])
        assert result.exit_code == 2 and "error:" in result.output, result.output  # nothing there to describe
        result = CliRunner().invoke(app, ["status", sys.argv[2]])  # a student run and its checkpoint
        assert result.exit_code == 0 and "step 3 of 8" in result.output and "step-00000002" in result.output, \
            result.output
        result = CliRunner().invoke(app, ["merge", sys.argv[1]])  # no partial index there
        assert result.exit_code == 2 and "error:" in result.output, result.output
        print(sorted(m for m in ("torch", "transformers", "stages.teacher", "stages.eval") if m in sys.modules))
        result = CliRunner().invoke(app, ["eval", "--help"])
        print(sorted(m for m in ("torch", "stages.eval") if m in sys.modules))
    """
    run = tmp_path / "student"  # as a student run leaves it part-way (what status reads of it)
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "state.pt").write_bytes(b"state")
    (run / "config.json").write_text('{"config": {"max_steps": 8}}')
    (run / "metrics.jsonl").write_text('{"step": 3, "loss": 5.0, "tokens_per_s": 100.0}\n')
    (tmp_path / "empty").mkdir()
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "empty"), str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "['stages.eval', 'torch']"]


def test_a_mistyped_command_gets_the_closest_one():
    result = CliRunner().invoke(app, ["merg"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: No such command 'merg' (did you mean 'merge'?); see 'distill --help'"
