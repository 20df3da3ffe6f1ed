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
