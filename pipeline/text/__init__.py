"""Text in: corpora, task examples, tokenizers, and packing token streams into rows.

Owns reading documents and prompt/response or chat records (with counts of what was skipped), the
corpus fingerprint, loading and training tokenizers, and :class:`~pipeline.text.packing.RowPacker`,
which cuts one token stream into the overlapping rows of a tokens store. May import: the top level
of ``pipeline``.
"""
