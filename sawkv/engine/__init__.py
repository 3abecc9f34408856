"""Serving engine: scheduler, block manager, model runner, sampler and the LLM facade."""
