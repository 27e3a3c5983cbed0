"""The rewrite run's typed config: defaults here, a YAML file in configs/, then command-line overrides."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

from .pools import DEFAULT_POOLS


@dataclass
class RewriteConfig:
    input: str = ""                 # captions: .txt (one per line), .csv (key/relative_image_path,caption), .jsonl
    out: str = ""                   # rewrite store directory
    engine: str = "vllm"            # vllm | openai | hf | eda | backtranslate
    model: str | None = "smollm2"   # model directory, .gguf file, or "smollm2" (embedded default)
    pools: list[str] = field(default_factory=lambda: list(DEFAULT_POOLS))  # names or JSONL paths
    seed: int = 0
    rewrites_per_pool: int = 1      # samples per prompt; 4 pools x 1 gives LaCLIP's M = 4
    shard_size: int = 1000          # captions per shard file (unit of resume and of rank assignment)
    batch_size: int = 8             # prompts per engine call
    max_retries: int = 2            # regenerations of a rejected rewrite before the slot is left empty
    rank: int | None = None         # default: the launcher's (common/ranks.py: $RANK, SLURM), else 0
    world_size: int | None = None   # default: $WORLD_SIZE, else 1
    threads: int | None = None      # torch CPU threads for the hf engine (1 is fastest on 2 cores)
    tensor_parallel_size: int = 1   # vllm on multi-GPU nodes
    llm_kwargs: dict = field(default_factory=dict)  # vllm: extra vllm.LLM arguments (on CPU builds
                                    # gpu_memory_utilization is the fraction of RAM kept for the KV cache)
    base_urls: list[str] = field(default_factory=list)  # openai: completions servers, requests spread over all
    max_in_flight: int = 64         # openai / vllm server: requests in flight per server
    chat: bool = False              # wrap the prompt in the model's chat template
    fidelity: bool = True           # store each rewrite's fidelity score (all-MiniLM-L6-v2 similarity to its original)
    progress: bool = True

    def resolved_rank(self) -> tuple[int, int]:
        from common.ranks import resolve_ranks  # the one rank resolution every stage shares
        found = resolve_ranks(self.rank, self.world_size)
        return found.rank, found.world_size

    def pool_names(self) -> list[str]:
        """Store pool names: the LLM engines have one per meta pool; baselines have one, their own."""
        if self.engine in ("eda", "backtranslate"):
            return [self.engine]
        from pathlib import Path
        return [Path(p).stem for p in self.pools]


def load_config(path: str | None = None, **overrides) -> RewriteConfig:
    values = {}
    if path:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        known = {f.name for f in dataclasses.fields(RewriteConfig)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RewriteConfig(**values)
