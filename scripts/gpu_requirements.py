"""Check the GPU set-up's pins against each other and the project's, from the wheels' metadata only.

    python scripts/gpu_requirements.py            # one line per conflict; exit 1 if any

What a GPU node installs: the project's pins, then the `gpu` extra (pyproject.toml) into .venv; vLLM
(scripts/setup.sh's VLLM_GPU) into its own .venv-vllm beside the torch pin that setup.sh installs there
first. For each pinned wheel (Linux x86_64, CPython 3.12, what a GPU node runs) the METADATA is read by
HTTP range requests from the wheel's zip directory (a few hundred kB, not the wheel: vLLM's is 300 MB, and
a full resolve would pull CUDA torch) and cached under .cache/wheel-metadata/. Every Requires-Dist that
applies there is checked against the pins installed beside it.
"""
from __future__ import annotations

import email.parser
import io
import re
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "wheel-metadata"
INDEX = "https://pypi.org/simple"
# a GPU node: Linux x86_64, CPython 3.12 (markers and wheel tags are evaluated for it)
NODE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: list[str]) -> dict[str, str]:
    """{canonical name: version} of `name==version` requirements; anything unpinned is an error."""
    from packaging.requirements import Requirement
    out = {}
    for text in requirements:
        req = Requirement(text)
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==":
            raise ValueError(f"{text!r}: the GPU set-up installs exact pins (name==version)")
        out[canonical(req.name)] = spec[0].version
    return out


def project_pins() -> tuple[dict[str, str], dict[str, str]]:
    """(the project's dependencies, the `gpu` extra) as pins."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return pins(project["dependencies"]), pins(project["optional-dependencies"]["gpu"])


def vllm_env_pins() -> dict[str, str]:
    """What scripts/setup.sh installs into the GPU node's .venv-vllm: its TORCH_VLLM and VLLM_GPU pins."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    found = {key: re.search(rf"^{key}=(\S+)", text, re.M) for key in ("VLLM_TORCH", "VLLM_GPU")}
    missing = [k for k, m in found.items() if not m]
    if missing:
        raise ValueError(f"scripts/setup.sh sets no {', '.join(missing)}")
    return pins([m.group(1) for m in found.values()])


class _RangeFile(io.RawIOBase):
    """A read-only file over HTTP range requests (what zipfile needs to read one member)."""

    def __init__(self, client, url: str, size: int):
        self.client, self.url, self.size, self.pos = client, url, size, 0

    def seekable(self):
        return True

    def readable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def readinto(self, buffer):
        end = min(self.pos + len(buffer), self.size)
        if end <= self.pos:
            return 0
        r = self.client.get(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        r.raise_for_status()
        data = r.content[:end - self.pos]
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _installable_on_node(tag) -> bool:
    """A wheel tag pip would install on a GPU node (CPython 3.12, Linux x86_64)."""
    platform_ok = tag.platform == "any" or re.fullmatch(r"(many)?linux.*x86_64", tag.platform)
    if tag.abi == "cp312":
        return bool(platform_ok) and tag.interpreter == "cp312"
    version = re.fullmatch(r"(?:py|cp)3(\d*)", tag.interpreter)
    return bool(platform_ok and version and tag.abi in ("none", "abi3") and int(version.group(1) or 0) <= 12)


def _wheel_for(client, name: str, version: str) -> dict:
    """The index's file entry of the wheel a GPU node would install for name==version."""
    from packaging.utils import parse_wheel_filename
    r = client.get(f"{INDEX}/{canonical(name)}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    r.raise_for_status()
    for entry in r.json()["files"]:
        if not entry["filename"].endswith(".whl") or entry.get("yanked"):
            continue
        _, wheel_version, _, tags = parse_wheel_filename(entry["filename"])
        if str(wheel_version) == version and any(_installable_on_node(t) for t in tags):
            return entry
    raise LookupError(f"{name}=={version}: no Linux x86_64 wheel for CPython 3.12 on {INDEX}")


def wheel_metadata(name: str, version: str) -> email.message.Message:
    """The METADATA of name==version's wheel (cached; fetched by range requests the first time)."""
    cached = CACHE / f"{canonical(name)}-{version}.METADATA"
    if not cached.is_file():
        import httpx
        with httpx.Client(follow_redirects=True, timeout=60) as client:
            entry = _wheel_for(client, name, version)
            if entry.get("core-metadata"):  # PEP 658: the index serves METADATA beside the wheel
                r = client.get(entry["url"] + ".metadata")
                r.raise_for_status()
                text = r.text
            else:
                with zipfile.ZipFile(io.BufferedReader(_RangeFile(client, entry["url"], entry["size"]),
                                                       buffer_size=256 * 1024)) as z:
                    member = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
                    text = z.read(member).decode()
        CACHE.mkdir(parents=True, exist_ok=True)
        from common.io import write_atomic
        write_atomic(cached, text)
    return email.parser.Parser().parsestr(cached.read_text())


def conflicts(installs: dict[str, str], beside: dict[str, str], where: str) -> list[str]:
    """Each Requires-Dist that applies on a GPU node, of the `installs` wheels and of the exact pins they
    bring in (vLLM's torchvision==..., transitively), that the versions installed beside them (`beside`
    includes `installs`) do not satisfy. The project's own pins are not expanded: the CPU set-up installs
    them together already (torch's CUDA libraries are PyTorch's own set)."""
    from packaging.requirements import Requirement
    env, todo, out = dict(beside), list(installs.items()), []
    while todo:
        name, version = todo.pop(0)
        for text in wheel_metadata(name, version).get_all("Requires-Dist") or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate(NODE_MARKERS):
                continue
            dep, pinned = canonical(req.name), env.get(canonical(req.name))
            exact = [s.version for s in req.specifier if s.operator == "=="]
            if pinned is None and exact:  # brought in at that version: its own requirements count too
                env[dep] = exact[0]
                todo.append((dep, exact[0]))
            elif pinned is not None and not req.specifier.contains(pinned, prereleases=True):
                out.append(f"{where}: {name}=={version} requires {req.name}{req.specifier}, "
                           f"but {req.name}=={pinned} is installed beside it")
    return out


def check() -> list[str]:
    """Every conflict of the GPU set-up, one line each ([] when it is installable)."""
    project, gpu = project_pins()
    clashes = [f"pyproject.toml: the gpu extra pins {n}=={v}, the project {n}=={project[n]}"
               for n, v in gpu.items() if n in project and project[n] != v]
    found = conflicts(gpu, {**project, **gpu}, "pip install -e '.[gpu]'")
    vllm_env = vllm_env_pins()
    return clashes + found + conflicts({n: v for n, v in vllm_env.items() if n != "torch"}, vllm_env,
                                       ".venv-vllm (GPU)")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    problems = check()
    print("\n".join(problems) or "GPU set-up: every pin agrees with the wheels' requirements")
    sys.exit(1 if problems else 0)
