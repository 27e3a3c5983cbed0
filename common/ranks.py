"""This process's rank and world size, whichever launcher started it; every stage asks here.

Order of precedence:
  1. explicit values (a stage's --rank / --world-size flags);
  2. RANK / WORLD_SIZE / LOCAL_RANK: the deepspeed launcher and torchrun (also when they run under srun);
  3. SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID: a task started by srun (SLURM_STEP_ID is set);
  4. nothing: one process, rank 0 of 1.
A launch that says there are several processes but not which one this is (WORLD_SIZE > 1 without RANK,
or an sbatch batch script with --ntasks > 1 run without srun) is refused with RankError instead of every
process silently becoming rank 0 of 1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


class RankError(ValueError):
    """The launch environment does not say which rank this process is (or says it inconsistently)."""


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    source: str          # "flags" | "torch" | "slurm" | "single"


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise RankError(f"${name}={env[name]!r} is not an integer") from None


def _from_env(env: Mapping[str, str]) -> Ranks:
    if "RANK" in env:
        if "WORLD_SIZE" not in env:
            raise RankError("$RANK is set but $WORLD_SIZE is not")
        return Ranks(_int(env, "RANK"), _int(env, "WORLD_SIZE"),
                     _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0, "torch")
    if "WORLD_SIZE" in env and _int(env, "WORLD_SIZE") > 1:
        raise RankError(f"$WORLD_SIZE={env['WORLD_SIZE']} but no $RANK: the launcher did not say which "
                        "process this is")
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return Ranks(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS") if "SLURM_NTASKS" in env else 1,
                     _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0, "slurm")
    if "SLURM_JOB_ID" in env and "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        raise RankError(f"SLURM job with {env['SLURM_NTASKS']} tasks but this process was not started by srun "
                        "(no $SLURM_STEP_ID): start every task with srun (or torchrun / deepspeed, which set $RANK)")
    return Ranks(0, 1, 0, "single")


def resolve_ranks(rank: int | None = None, world_size: int | None = None,
                  env: Mapping[str, str] | None = None) -> Ranks:
    """Rank, world size and local rank of this process (see the module docstring). A flag given alone
    takes the other value from the launcher."""
    env = os.environ if env is None else env
    if rank is not None and world_size is not None:
        found = Ranks(rank, world_size, _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0, "flags")
    else:
        found = _from_env(env)
        if rank is not None or world_size is not None:
            found = Ranks(found.rank if rank is None else rank,
                          found.world_size if world_size is None else world_size, found.local_rank, "flags")
    if found.world_size < 1 or not 0 <= found.rank < found.world_size:
        raise RankError(f"rank {found.rank} is outside world size {found.world_size} (from {found.source})")
    return found


def export_torch_env(ranks: Ranks, env: dict | None = None) -> None:
    """Set RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT when missing) so that
    torch.distributed's env:// rendezvous (DeepSpeed's init_distributed) finds them under SLURM.
    MASTER_ADDR defaults to the node srun was launched from; MASTER_PORT to one derived from the job id."""
    env = os.environ if env is None else env
    env.update(RANK=str(ranks.rank), WORLD_SIZE=str(ranks.world_size), LOCAL_RANK=str(ranks.local_rank))
    if ranks.world_size > 1 and "MASTER_ADDR" not in env:
        if "SLURM_LAUNCH_NODE_IPADDR" not in env:
            raise RankError("several ranks but no $MASTER_ADDR: export MASTER_ADDR (the first node) in the job script")
        env["MASTER_ADDR"] = env["SLURM_LAUNCH_NODE_IPADDR"]
    if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
        env["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a one-machine rendezvous or a local server)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
