"""Attention over the paged KV cache: the torch reference (``reference.py``, the CPU path and the
kernels' oracle) and the backends that pick between it and the Triton kernels."""
