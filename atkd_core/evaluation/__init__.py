"""Evaluation: lm-evaluation-harness over the pipeline's models, and the easy/hard token analysis."""
