"""The ``distill`` console script: pre-emption signals are caught from its first instruction.

Only then are the CLI, torch and transformers imported. Those imports (and loading a model after
them) take seconds, and a SLURM warning then would otherwise end the process by its default action:
a lost job instead of a requeued one (``pipeline/preempt.py``). ``python -m stages.cli`` does the
same at the top of ``stages/cli.py``.
"""


def main():
    from pipeline.preempt import catch_early

    catch_early()
    from stages.cli import main as cli_main

    return cli_main()
