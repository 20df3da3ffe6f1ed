"""What stage one computes from a teacher's logits, on any device.

Owns the top-k with its exact tail and log-sum-exp over the temperature grid (``topk``), the sampled
targets with their keyed draws (``sampling``), the fused CPU kernel (``sparse_teacher.c``) with
its ctypes binding (``native``), and the fused GPU kernels in Triton (``fused_gpu``). The bindings
know nothing of the torch paths; ``topk`` and ``sampling`` choose between the kernels and torch,
and check each kernel against their torch path once. May import: the top level of ``pipeline``.
"""
