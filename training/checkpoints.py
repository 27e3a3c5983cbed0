"""The trainer's checkpoints: save (DeepSpeed's files + a self-describing export), resume, prune, `latest`,
and the random number generators' state each rank stores."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.io import write_atomic
from training.config import config_dict

CHECKPOINT_FORMAT_VERSION = 1


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def full_fp32_state_dict(engine) -> dict:
    """Consolidated fp32 weights (collective: every rank calls it; the values are on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param
    sd = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        sd[name] = (full if full is not None else p.detach()).float().cpu().clone()
    for name, b in engine.module.named_buffers():
        sd[name] = b.detach().cpu().clone()
    return sd


def save_checkpoint(engine, cfg, model_config: dict, step: int, data, rank: int) -> Path:
    """DeepSpeed's files, the model config beside them (<tag>/config.json) and export/ (fp32 weights and
    config.json); `latest` moves to the tag only when all are written (collective: every rank calls it).
    `data` is the MicroBatches stream: the checkpoint stores the position of its next batch."""
    from model import build_model
    from model.checkpoint import save_export
    root = Path(cfg.run_dir) / "checkpoints"
    tag = f"step-{step:07d}"
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    client = {"format_version": CHECKPOINT_FORMAT_VERSION, "step": step, "world_size": dist.get_world_size(),
              "epoch": data.epoch,
              "batch_in_epoch": data.batch, "rng": rngs, "config": config_dict(cfg)}
    if data.remaining is not None:  # the epoch was re-sliced at another world size (training/elastic.py)
        client["remaining"] = [list(r) for r in data.remaining]
    # DeepSpeed writes `latest` before the other ranks finish their shards; we move it ourselves, last
    engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
    sd = full_fp32_state_dict(engine)
    if rank == 0:
        write_atomic(root / tag / "config.json", json.dumps(model_config, indent=1))  # self-describing
        model = build_model(model_config)
        model.load_state_dict(sd)
        save_export(model, model_config, root / tag / "export")
    dist.barrier()  # every rank's files are written
    if rank == 0:
        write_latest(root, tag)
    if rank == 0 and cfg.keep_checkpoints:
        prune_checkpoints(root, cfg.keep_checkpoints)
    dist.barrier()
    return root / tag


def write_latest(root: Path, tag: str):
    """Point <root>/latest at tag atomically: a kill leaves the old pointer or the new, never half."""
    write_atomic(root / "latest", tag)


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step-XXXXXXX checkpoints (never the one `latest` names)."""
    import shutil
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    tags = sorted(p for p in root.glob("step-*") if p.is_dir())
    doomed = [p for p in tags[:-keep] if p.name != latest]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "train.log", "checkpoints", "tensorboard")


def refuse_existing_run(run_dir: Path, resuming: bool) -> None:
    """A new run must not overwrite another's outputs (metrics.jsonl would be truncated)."""
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if found and not resuming:
        raise FileExistsError(f"{run_dir} already holds a run ({', '.join(found)}); continue it with "
                              "--resume latest or choose another run_dir")


def resolve_resume(spec: str, run_dir: Path) -> tuple[Path, str] | None:
    """'latest' or a path (checkpoints dir, or a tag dir) -> (DeepSpeed load dir, tag); None for 'latest'
    when run_dir has no checkpoint yet (a fresh start, as open_clip's --resume latest)."""
    path = run_dir / "checkpoints" if spec == "latest" else Path(spec)
    if spec == "latest" and not (path / "latest").is_file():
        return None
    if (path / "latest").is_file():
        load_dir, tag = path, (path / "latest").read_text().strip()
    elif (path / "mp_rank_00_model_states.pt").is_file() or path.name.startswith("step-"):
        load_dir, tag = path.parent, path.name
    else:
        raise FileNotFoundError(f"--resume {spec}: no checkpoint at {path} (no 'latest' file and not a "
                                "step-XXXXXXX directory)")
    # DeepSpeed would fail on an empty or half-copied tag folder with a bare assertion, after the build
    if not any((load_dir / tag).glob("*model_states.pt")):
        raise FileNotFoundError(f"--resume {spec}: {load_dir / tag} holds no DeepSpeed checkpoint "
                                "(no *model_states.pt file: empty, missing or not fully copied)")
    return load_dir, tag
