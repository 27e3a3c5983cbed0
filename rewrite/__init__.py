"""rewrite/: LaCLIP's caption rewriting (LLM in-context rewrites, EDA and back-translation baselines).

captions file -> `python -m rewrite` -> rewrite store (rewrite/store.py) -> loaders/ pack.
"""
from .store import import_laclip, iter_rewrites, load_rewrites  # noqa: F401
