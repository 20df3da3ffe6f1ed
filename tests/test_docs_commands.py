"""The `distill` command lines the README and the reference pages show use commands and flags that exist
(#33): a renamed flag fails here, not in a reader's first ten minutes. Only ```bash blocks are read;
their output is not checked."""

from __future__ import annotations

import re

import pytest
import typer

from tests.conftest import ROOT

BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
SEPARATOR = re.compile(r"&&|\|\||;|\||\bdo\b|\bthen\b")


def command_options() -> dict[str, set[str]]:
    from stages.cli import app

    group = typer.main.get_command(app)
    commands = {name: group.get_command(None, name) for name in group.list_commands(None)}
    return {name: {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
            for name, command in commands.items()}


def distill_calls(text: str) -> list[tuple[str, list[str]]]:
    """(command, its words) of every `distill COMMAND …` (or `-m stages.cli COMMAND …`) in ```bash blocks,
    continuation lines joined, comments dropped."""
    calls = []
    for block in BASH_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)
            for part in SEPARATOR.split(line):
                words = part.split()
                for i, word in enumerate(words[:-1]):
                    if word.endswith("distill") or (word == "stages.cli" and i and words[i - 1] == "-m"):
                        calls.append((words[i + 1], words[i + 2:]))
                        break
    return calls


def test_the_quick_start_is_found():
    calls = distill_calls((ROOT / "README.md").read_text())
    assert {c for c, _ in calls} >= {"prepare", "teacher", "student", "eval", "report"}


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted((ROOT / "docs" / "reference").glob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_and_flag_shown_exists(page):
    options = command_options()
    problems = []
    for command, words in distill_calls(page.read_text()):
        if command not in options:
            problems.append(f"distill {command}: no such command")
            continue
        problems += [f"distill {command} {w}: no such flag" for w in words
                     if w.startswith("--") and w.split("=")[0] not in options[command]]
    assert problems == []


def test_a_wrong_flag_is_caught():
    text = "```bash\ndistill student --train-store s --tempreature 2 && distill stuent --out o\n```\n"
    calls = distill_calls(text)
    assert calls == [("student", ["--train-store", "s", "--tempreature", "2"]), ("stuent", ["--out", "o"])]
    options = command_options()
    assert "--tempreature" not in options["student"] and "stuent" not in options
