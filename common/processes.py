"""Launcher watching: a rank notices when the launcher that started it (deepspeed, torchrun) is gone."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time


def is_launcher(cmdline: list[str]) -> bool:
    """`deepspeed ...`, `python -m deepspeed.launcher.{runner,launch}`, `torchrun`, `-m torch.distributed.run`."""
    return any(os.path.basename(arg) in ("deepspeed", "torchrun")
               or arg.startswith(("deepspeed.launcher.", "torch.distributed.run")) for arg in cmdline)


def launcher_chain() -> list:
    """The launcher processes above this rank (deepspeed's runner and launch.py, torchrun), nearest first."""
    import psutil
    chain, proc = [], psutil.Process().parent()
    while proc is not None and proc.pid > 1:
        try:
            if not is_launcher(proc.cmdline()):
                break
            chain.append(proc)
            proc = proc.parent()
        except psutil.Error:
            break
    return chain


def _alive(proc) -> bool:
    import psutil
    try:  # is_running also compares the start time, so a reused pid counts as dead
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch_launcher(on_death, interval: float = 0.5):
    """Call on_death(description) once if any launcher above this rank exits.

    The deepspeed runner on one node installs no signal handler: SIGTERM kills it at once and its
    launch.py keeps the ranks running with nobody left to stop them. So each rank polls its whole
    launcher chain, and asks the kernel for SIGTERM (PR_SET_PDEATHSIG) when its direct parent dies.
    """
    chain = launcher_chain()
    if not chain:
        return
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    def poll():
        while True:
            for proc in chain:
                if not _alive(proc):
                    on_death(f"launcher process {proc.pid} exited")
                    return
            time.sleep(interval)

    threading.Thread(target=poll, name="launcher-watch", daemon=True).start()
