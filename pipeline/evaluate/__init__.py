"""The tasks a model is evaluated on, as data: task files, QA definitions, scoring.

Owns reading LAMBADA, StoryCloze, HellaSwag and QA sets, the QA definitions (lm-evaluation-harness's
and the paper's prompts, few-shot samplers, answer normalisation and exact match). Running a model
over them is ``stages/eval.py``'s. May import: the top level of ``pipeline`` and ``pipeline.text``.
"""
