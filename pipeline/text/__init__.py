"""Text: corpus reading, tokenizers, and the byte alignment of two tokenizations (align)."""
