"""Resuming a checkpoint at another world size (preemptible jobs come back on other node counts).

ZeRO 1-3 store the optimizer state (and at stage 3 the weights) as one partition per rank, which
DeepSpeed loads only at the world size that wrote them. A resume at another size converts the
checkpoint once with DeepSpeed's universal checkpoint (deepspeed.checkpoint.ds_to_universal: per
parameter fp32 weights and Adam moments, whole) into <tag>/universal/, which any world size loads
("checkpoint": {"load_universal": true}) and re-partitions. The conversion is written to a temporary
folder and renamed into place, so a re-run finds it complete or not at all (a killed conversion's
folder is removed and redone). ZeRO 0 keeps the whole optimizer state in one file: any size loads it.

The data position is carried over in samples: the checkpoint records (epoch, micro batches read per
rank) at its world size and micro batch. data=synthetic hands out each step's global batch as a
function of (seed, epoch, step) only, whatever the split into ranks x accumulation x micro batch, so the
same number of samples at the new size is the start batch there and the next global batch is exactly
the one an uninterrupted run would see. The packed-data loaders give each rank a contiguous slice of
the epoch's order (loaders/sampling.py); mid-epoch at another size, the ranges each old rank had still
to read (rank after rank) become the epoch's `remaining` order, which the new ranks slice from batch 0.
The epoch so reads each sample once (less the new slicing's drop_last tail); the checkpoint records
the ranges, so later resumes in that epoch (same size or another again) continue from them, and the
next epoch slices the whole order again.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

UNIVERSAL = "universal"  # the converted copy's folder inside the checkpoint's tag folder


class ElasticError(ValueError):
    """A checkpoint that cannot resume at this world size: one line, exit 2."""


def saved_partitions(tag_dir: Path) -> int:
    """The number of ranks whose ZeRO partitions the checkpoint holds (0: ZeRO 0, no partitions).
    ZeRO 1/2 (bf16 at stage 1: bf16_zero_...) and ZeRO 3 write one *optim_states.pt per rank."""
    return len(list(tag_dir.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt")))


def prepare_resume(load_dir: Path, tag: str, rank: int, world: int) -> tuple[Path, str, str | None]:
    """(load dir, tag, how) to hand to engine.load_checkpoint (collective: every rank calls it). `how` is
    None when the checkpoint loads as it is; otherwise the tag is the checkpoint's universal copy
    (converted here by rank 0 unless cached), to load with "load_universal", and `how` says so."""
    tag_dir = Path(load_dir) / tag
    partitions = saved_partitions(tag_dir)
    if partitions in (0, world):
        return Path(load_dir), tag, None
    universal = tag_dir / UNIVERSAL
    cached = universal.is_dir()
    error = None
    if rank == 0 and not cached:
        try:
            convert_to_universal(tag_dir, universal)
        except ElasticError as err:
            error = str(err)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if errors[0]:
        raise ElasticError(errors[0])
    if not (universal / "zero" / "optimizer_state.pt").is_file():  # a rank that cannot see rank 0's files
        raise ElasticError(f"rank {rank}: {universal} is not readable here (the checkpoint folder must be "
                           "shared by every rank)")
    how = "loaded the cached" if cached else "converted it once to a"
    return tag_dir, UNIVERSAL, f"{how} universal checkpoint ({universal}), re-partitioned for {world} rank(s)"


def convert_to_universal(tag_dir: Path, out: Path):
    """DeepSpeed's ds_to_universal on tag_dir, written to a temporary folder and renamed to `out`."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion killed half way: redo it
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # our checkpoints carry no universal_checkpoint_info of their own
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / "zero" / "optimizer_state.pt").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise ElasticError(f"{tag_dir}: DeepSpeed cannot convert this checkpoint to another world size "
                           f"(ds_to_universal: {lines[-1] if lines else f'exit {proc.returncode}'})")
    tmp.rename(out)


def saved_world(client: dict) -> int:
    """The world size that wrote the checkpoint (client state; older ones hold one rng state per rank)."""
    return client["world_size"] if "world_size" in client else len(client["rng"])


def data_position(client: dict, cfg, world: int) -> tuple[int, int, list | None]:
    """(epoch, start batch, remaining ranges or None) at this world size and micro batch of the
    checkpoint's data position."""
    epoch, batch, remaining = client["epoch"], client["batch_in_epoch"], client.get("remaining")
    remaining = None if remaining is None else [tuple(r) for r in remaining]  # stored as lists
    old_world = saved_world(client)
    saved_micro = client["config"]["micro_batch"]
    if (old_world, saved_micro) == (world, cfg.micro_batch) or batch == 0:
        return epoch, batch, remaining
    if cfg.data != "synthetic":
        from loaders.sampling import unread_ranges
        from training.data import dataset_samples
        left = unread_ranges(dataset_samples(cfg), remaining, old_world, saved_micro, batch)
        if sum(b - a for a, b in left) // world < cfg.micro_batch:  # all but the new drop_last tail read
            return epoch + 1, 0, None
        return epoch, 0, left
    samples = batch * saved_micro * old_world
    if samples % (cfg.micro_batch * world):
        raise ElasticError(f"the checkpoint's position ({samples} samples into epoch {epoch}) is not a whole "
                           f"number of micro batches of {cfg.micro_batch} x {world} ranks; choose micro_batch "
                           "so that it is")
    return epoch, samples // (cfg.micro_batch * world), None
