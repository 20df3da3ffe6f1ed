"""Text out: sampling from a causal LM in batches, under rules.

Owns the decoding loop with keyed, reproducible draws (``generation``) and the rule files that
constrain what may be written (``rules``: banned phrases, regexes, length limits, counted as
violations). May import: the top level of ``pipeline`` and ``pipeline.teacher`` (the keyed
uniforms that stage one's draws also use).
"""
