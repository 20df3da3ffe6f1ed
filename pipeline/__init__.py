"""distill's shared library: config, corpus, tokenizer, the store, models, checkpoints, losses."""

__version__ = "0.1.0"
