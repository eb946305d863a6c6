"""Evaluation (SPEC §4): generation, LLM-judge scores, overlap diagnostics, the report."""
