"""distill's shared library: what the stages share — config, corpus and task examples, tokenizers, the
store, the teacher's top-k and sampled signals, losses, data loader, models, checkpoints, generation
under rules, evaluation tasks."""

__version__ = "0.1.0"
