"""Text in: corpora, task examples, tokenizers, packing token streams into rows, and aligning two tokenizations.

Owns reading documents and prompt/response or chat records (with counts of what was skipped), the
corpus fingerprint, loading and training tokenizers, :class:`~pipeline.text.packing.RowPacker`,
which cuts one token stream into the overlapping rows of a tokens store, and ``align``: the byte
spans of two tokenizations of the same text, their chunks and the teacher → student vocabulary map
that cross-tokenizer distillation uses. May import: the top level of ``pipeline``.
"""
