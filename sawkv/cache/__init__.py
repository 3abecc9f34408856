"""Paged KV cache: page pool tensors (kv_cache) and the block allocator with prefix caching."""
