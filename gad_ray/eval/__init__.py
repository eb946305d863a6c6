"""Evaluation (docs/algorithms.md §5): generation, LLM-judge scores, overlap diagnostics, the report."""
