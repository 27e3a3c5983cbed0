"""Helpers every stage shares (rank resolution across launchers: common/ranks.py)."""
