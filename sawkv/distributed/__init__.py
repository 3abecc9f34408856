"""Tensor parallelism for the serving engine on torch.distributed (NCCL on GPU, gloo on CPU).

``parallel_state`` (ranks, groups, collectives), ``layers`` (row-parallel linear, vocab-parallel
embedding and LM head, head-count checks), ``loader`` (sharded safetensors), ``runner`` (the
per-rank model runner, the step plan rank 0 broadcasts, the worker loop), ``launch`` (spawn
or torchrun).
"""
