"""Helpers every stage shares: rank resolution across launchers (common/ranks.py), atomic writes and
JSONL reading (common/io.py)."""
