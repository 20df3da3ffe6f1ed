"""What stage one computes from a teacher's logits, on any device.

Owns the top-k with its exact tail and log-sum-exp over the temperature grid (``topk``), the sampled
targets with their keyed draws (``sampling``), and the fused CPU kernel (``sparse_teacher.c``) with
its ctypes binding (``native``). The binding knows nothing of the torch paths; ``topk`` and
``sampling`` choose between the kernel and torch, and check the kernel against their torch path
once. May import: the top level of ``pipeline``.
"""
