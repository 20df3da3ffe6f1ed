"""Training: the losses, the teacher signal, the loader (cross-tokenizer pieces so far)."""
