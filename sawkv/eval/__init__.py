"""Accuracy harness: evaluation texts and token windows (data), perplexity and task metrics."""
