"""The store: what stage one and ``prepare`` write and every later stage reads.

Owns the store contract (``docs/FORMAT.md``): ``index.json`` with its versions, parameters and
checksums, the zarr and Arrow shard writers and the one checked reader, partial indexes and their
merge, repair, and the policy for an output directory that already holds a store. It knows nothing
of models, tokenizers or training. May import: the top level of ``pipeline`` (errors, atomic files).
"""
