"""Synthetic black-box teacher: rule-based tasks and an OpenAI-compatible server."""
