"""The baseline method names (kivi, kmeans, gptq, mixed) register from sawkv.eval."""

import sawkv.eval  # noqa: F401
