"""Stage two's parts: everything a student's training loop uses besides the model itself.

Owns the losses (pure functions, shapes in docstrings; ``onpolicy``: the sampled-token policy
gradient), the teacher signal read from a store or an online teacher, the cross-tokenizer losses and signal (``cross_losses``, ``cross_signal``), the
deterministic, resumable loader, checkpoints, how the student is spread over processes
(``distributed``: process group, DDP/FSDP, the global batch and data order, sharded checkpoints),
the student's initialisation from teacher layers, and the metrics log. May import: the top level of ``pipeline``, ``pipeline.store`` (the loader reads
shards), ``pipeline.teacher`` (re-tempering stored top-k log-probs) and ``pipeline.text`` (aligning
a store's rows to a student of another tokenizer).
"""
