"""The ``distill`` command line: one typer command per stage, generated from the stage's config.

A stage's frozen config dataclass is the single definition of its options: each field becomes a
``--flag`` (help text from the field), ``--config FILE`` supplies a YAML/JSON file, and flags
override the file. Errors a user can fix print as one line and exit with status 2.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m stages.cli: before torch is imported (pipeline/preempt.py, catch_early)
    from pipeline.preempt import catch_early

    catch_early()

import contextlib
import dataclasses
import difflib
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape as rich_escape
from typer.core import TyperGroup

from pipeline.config import field_types, flag, load_config, split_list
from pipeline.errors import DistillError
from pipeline.hub import resolve_model_paths
from pipeline.io import disk_full, disk_full_message
from pipeline.preempt import start_stage

# click's exceptions, from the click typer runs on (newer typers vendor their own copy)
click_errors = importlib.import_module(typer.BadParameter.__module__)


def usage_error_line(e, command_path: str) -> str:
    """A command-line mistake (unknown option or command, a value of the wrong type, an extra
    argument) as one line: what is wrong, the closest right spelling, where the help is."""
    if isinstance(e, click_errors.NoSuchOption):
        message = f"No such option: {e.option_name}"
        if e.possibilities:  # click's own close matches (difflib), closest first
            message += f" (did you mean {e.possibilities[0]}?)"
    else:  # click's message may span lines; typer's "No such command 'x'. Did you mean 'y'?" is reworded
        message = " ".join(e.format_message().split()).rstrip(".")
        message = re.sub(r"\. Did you mean (.+)\?$", r" (did you mean \1?)", message)
    return f"{message}; see '{command_path} --help'"


class DistillGroup(TyperGroup):
    """The ``distill`` group: a usage error of the group or of any command is one ``error: …`` line
    and exit status 2, like every other error a user can fix (click would print usage, a hint and a
    boxed message). In the group, not in ``main()``, so that every caller of ``app`` gets it."""

    def list_commands(self, ctx):
        return list(STAGES)

    def get_command(self, ctx, name):
        if name not in self.commands and name in STAGES:  # its module imported only now
            self.add_command(build_command(name), name)
        return super().get_command(ctx, name)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click_errors.UsageError as e:  # typer suggests from the commands loaded, which are none yet
            if args and "Did you mean" not in e.message and (matches := difflib.get_close_matches(args[0], STAGES)):
                e.message = f"{e.message.rstrip('.')}. Did you mean {', '.join(map(repr, matches))}?"
            raise

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_usage_errors(None):
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line_usage_errors(ctx):  # resolving the command and parsing its options
            return super().invoke(ctx)


@contextlib.contextmanager
def _one_line_usage_errors(group_ctx):
    try:
        yield
    except getattr(click_errors, "NoArgsIsHelpError", ()):
        raise  # `distill` alone prints the help
    except click_errors.UsageError as e:
        if e.ctx is not None:
            path = e.ctx.command_path
        elif group_ctx is not None:  # some parser errors carry no context: the command being parsed
            path = " ".join(filter(None, (group_ctx.command_path, group_ctx.invoked_subcommand)))
        else:
            path = "distill"
        typer.echo(f"error: {usage_error_line(e, path)}", err=True)
        raise typer.Exit(2) from None


app = typer.Typer(name="distill", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  cls=DistillGroup,
                  help="Offline knowledge distillation for causal language models.")

def _option_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:  # repeatable, and comma-separated: --shots 0,1,8
        return Optional[list[str]]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return Optional[args[0]]
    return Optional[hint]


def stage_command(on: typer.Typer, name: str, config_cls: type, run: Callable[[Any], Any], help: str,
                  positional: tuple[str, ...] = (), models: bool = True) -> None:
    """Register ``NAME`` on ``on``: flags from ``config_cls`` fields (``positional`` ones as
    arguments), then ``run(config)``; with ``models``, options naming a model or tokenizer may be Hub
    ids, resolved from the local cache first (:mod:`pipeline.hub`)."""
    params = [inspect.Parameter(
        "config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
        default=typer.Option(None, "--config", help="YAML or JSON file of options; flags override it."),
    )]
    types = field_types(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.metadata.get("file_only"):  # a mapping or list: only a --config file can hold it
            continue
        option_flag = flag(field.name)
        decls = [f"{option_flag}/--no-{option_flag[2:]}"] if types[field.name] is bool else [option_flag]
        help_text = field.metadata.get("help", "")
        # the option's own default is None (unset: the config file's value or the field's stands), so the
        # field's default goes into the help text, escaped: rich read "[default: …]" as markup and dropped it
        if (shown := _shown_default(field.default, types[field.name] is bool, option_flag)) is not None:
            help_text += "  " + rich_escape(f"[default: {shown}]")
        if field.name in positional:
            default = typer.Argument(None, help=help_text, show_default=False)
        else:
            default = typer.Option(None, *decls, help=help_text, show_default=False)
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=_option_type(types[field.name]), default=default))

    def command(config_file: Optional[Path] = None, **flags: Any) -> None:
        overrides = {k: split_list(v) if isinstance(v, list) else v
                     for k, v in flags.items() if v is not None and v != []}
        start_stage(run, name)  # a pre-emption signal that came while distill was starting (preempt.py)
        try:
            config = load_config(config_cls, config_file, **overrides)
            run(resolve_model_paths(config) if models else config)
        except DistillError as e:
            _close_progress_bars()
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except OSError as e:  # a full disk or quota is the user's to fix: one line; any other OSError is a bug
            if disk_full(e) is None:
                raise
            _close_progress_bars()
            typer.echo(f"error: {disk_full_message(e, overrides.get('out'))}", err=True)
            raise typer.Exit(2)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = help
    on.command(name, help=help)(command)


def _shown_default(default: Any, boolean: bool, option_flag: str) -> str | None:
    """What ``--help`` shows as an option's default: the field's value (a flag's spelling for a bool),
    or nothing for an empty default (whose help says what empty means)."""
    if boolean:
        return option_flag if default else f"--no-{option_flag[2:]}"
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    return None if default in ("", None) else str(default)


def _close_progress_bars() -> None:
    """End any progress bar's line so that an error prints on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@dataclasses.dataclass(frozen=True)
class Stage:
    """One ``distill`` command: where its config and function live, and its help. Its module is
    imported only when the command runs (or ``--help`` lists them all): ``merge``, ``status``,
    ``inspect`` and ``report`` never import torch (``slurm`` does once it reads the stages' configs)."""

    module: str
    config: str
    run: str
    help: str
    positional: tuple[str, ...] = ()
    models: bool = True  # options naming a model or tokenizer may be Hub ids (pipeline.hub)


_TRAIN = "stages.student", "TrainConfig", "train"
STAGES = {
    "tokenizer": Stage("stages.tokenizer", "TokenizerConfig", "train_tokenizer",
                       "Train a byte-level BPE tokenizer on a corpus (Hugging Face format)."),
    "generate": Stage("stages.generate", "GenerateConfig", "generate",
                      "The teacher writes a synthetic corpus (JSONL that prepare reads) from prompts or from BOS, "
                      "optionally under rules (--rules)."),
    "prepare": Stage("stages.prepare", "PrepareConfig", "prepare",
                     "Stage 0: tokenize a corpus, or task examples with a loss mask, and pack it into a sharded "
                     "'tokens' store."),
    "teacher": Stage("stages.teacher", "TeacherConfig", "run_teacher",
                     "Stage one: run the teacher once over a tokens store and store its predictions: N draws per "
                     "position (--kind sampled, the default), the top-k and exact tail mass (--kind topk), or both "
                     "(--kind topk --tail-samples M)."),
    "merge": Stage("stages.merge", "MergeConfig", "merge",
                   "Check that parallel stage-one jobs cover every shard and write index.json; for a tokens store "
                   "that prepare tasks filled, cut its rows from their pieces.",
                   positional=("store",)),
    "inspect": Stage("stages.inspect_store", "InspectConfig", "inspect_store",
                     "Describe a store: rows, bytes per token, kept mass and entropy (top-k) or distinct drawn ids "
                     "(draws); --verify checks every chunk and shard, --repair forgets bad shards.",
                     positional=("store",)),
    "status": Stage("stages.status", "StatusConfig", "status",
                    "Where a run stands, from what it has written: a stage-one store being filled (shards by task, "
                    "tokens, rate, ETA), a tokens store being prepared, a student run, a rounds OUT or a `distill "
                    "slurm` OUT (job states from squeue/sacct). Only reads.",
                    positional=("path",), models=False),
    # One command, two names: `student` is stage two of the pipeline; `train` says what it does when it
    # trains without a teacher (the shipped teacher, the CE-only baseline).
    "student": Stage(*_TRAIN, "Stage two: train a student from a stage-one store (offline distillation: sampled, "
                     "top-k or hybrid), a tokens store with --teacher (online) or a tokens store alone "
                     "(cross-entropy). Same as `distill train`."),
    "train": Stage(*_TRAIN, "Train a causal LM from a store: cross-entropy, or distillation from a stage-one store "
                   "(sampled, top-k or hybrid) or --teacher. Same as `distill student`."),
    "eval": Stage("stages.eval", "EvalConfig", "run_eval",
                  "Evaluate a model: held-out perplexity, LAMBADA, HellaSwag, StoryCloze, QA (NQ, TriviaQA, "
                  "WebQuestions, a custom task; with --rules, also under rules), agreement with a top-k store."),
    "report": Stage("stages.report", "ReportConfig", "make_report",
                    "Tables and figures comparing evaluated models: a row per run, the paper's tables over seed "
                    "groups (teacher, students, CE-only, rules), metric-vs-T/α curves.",
                    positional=("runs",), models=False),  # its --teacher names a run, not a model
    "rounds": Stage("stages.rounds", "RoundsConfig", "rounds_command",
                    "On-policy distillation in rounds: the student writes completions, the teacher scores them "
                    "offline (stage one), the student trains on them; R rounds, each step resumable, a held-out "
                    "reverse-KL estimate and teacher tokens spent per round."),
    "plan": Stage("stages.plan", "PlanConfig", "plan",
                  "Size a cluster run before submitting it: the store on disk, stage-one GPU-hours and array size, "
                  "stage two."),
    "slurm": Stage("stages.slurm", "SlurmConfig", "slurm",
                   "Write (and with --submit, submit) the pipeline as SLURM jobs: a stage-one array, merge, stage two "
                   "under torchrun, eval and report, chained by dependencies; with --rounds, every step of every "
                   "round of a `distill rounds` config."),
}


def build_command(name: str):
    """The click command of ``distill NAME``, its stage's module imported now."""
    stage = STAGES[name]
    module = importlib.import_module(stage.module)
    one = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    stage_command(one, name, getattr(module, stage.config), getattr(module, stage.run), stage.help,
                  positional=stage.positional, models=stage.models)
    command = typer.main.get_command(one)
    command.name = name
    return command


@app.callback()
def _group() -> None:  # no docstring: the group's help is the app's
    pass  # a callback makes typer build a group, which then has no command registered up front


def main() -> None:
    app(prog_name="distill")


if __name__ == "__main__":
    sys.exit(main())
