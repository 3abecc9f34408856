"""Accuracy harness: evaluation texts and token windows (data), perplexity and task metrics.

Importing this package registers the evaluation-only baseline methods (KIVI, k-means, GPTQ,
mixed precision) in the method-name registry: see :mod:`sawkv.eval.baselines`.
"""

from sawkv.eval import baselines  # noqa: F401  registers the kivi/kmeans/gptq/mixed names
