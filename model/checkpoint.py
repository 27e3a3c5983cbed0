"""Reading and writing model weights.

Formats load_checkpoint(path, model_name=None) accepts:
  export     a directory (or its weights file) written by save_export, in open_clip's hub layout:
             open_clip_model.safetensors (the one weights file: open_clip's names, fp32, with
             format/format_version/sha256/config in its metadata), open_clip_config.json (model_cfg and
             preprocess_cfg), config.json (our model config) and, for a SLIP model only,
             slip_head.safetensors (the head open_clip has no place for). open_clip loads the directory as
             create_model_and_transforms("local-dir:DIR"). Exports of format_version 1 (model.safetensors
             in our names beside an open_clip copy) still load.
  deepspeed  a DeepSpeed checkpoint: the tag directory (holding *mp_rank_00_model_states.pt), or the
             directory holding `latest`. If <tag>/export/ exists (train.py writes one) it is used;
             otherwise the fp32 weights are consolidated with DeepSpeed's own
             get_fp32_state_dict_from_zero_checkpoint, and the model config is taken from
             <tag>/export/config.json, <tag>/config.json (train.py writes both) or model_name. (DeepSpeed's
             consolidation unpickles its own files; for checkpoints from
             elsewhere prefer the export, which is safetensors with a checksum.)
  hub        open_clip's hub layout from elsewhere (open_clip_config.json + open_clip_model.safetensors or
             open_clip_pytorch_model.bin), or local-dir:DIR (an hf-hub:ORG/REPO name is downloaded first by
             model.hub.resolve_location).
  open_clip  an open_clip state dict: .pt/.pth/.bin (torch.load(weights_only=True): plain dict or
             {"state_dict": ...}, "module." prefixes allowed) or .safetensors; needs model_name (a
             model/configs name) since the file carries no config.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
from pathlib import Path

import torch

from common.io import write_with
from model.clip import CLIP, IMAGE_MEAN, IMAGE_STD, build_model, resolve_config

EXPORT_FORMAT = "laclip-export"
EXPORT_VERSION = 2  # 1: model.safetensors (our names) and an open_clip copy; 2: the open_clip file only
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"  # WEIGHTS_NAME: version 1 exports only
OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG = "open_clip_model.safetensors", "open_clip_config.json"
SLIP_HEAD_WEIGHTS = "slip_head.safetensors"


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model architecture. str(): every key, one per line;
    one_line(): the source and the first few, for a command's single error line."""

    def __init__(self, source: str, model_name: str, missing: list, unexpected: list, shapes: list):
        self.source, self.model_name = source, model_name
        self.parts = [(t, items) for t, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                                  ("shape mismatches", shapes)) if items]
        super().__init__(f"{source} does not match model {model_name!r}:" + "".join(
            f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:20])
            + (f"\n    ... {len(items) - 20} more" if len(items) > 20 else "") for title, items in self.parts))

    def one_line(self, first: int = 3) -> str:
        return f"{self.source} does not match model {self.model_name!r}: " + "; ".join(
            f"{title} ({len(items)}): " + ", ".join(items[:first]) + (", ..." if len(items) > first else "")
            for title, items in self.parts)


class CheckpointReadError(ValueError):
    """A checkpoint file could not be read (truncated, corrupt, not the format its name says)."""


@contextlib.contextmanager
def reading(path, role: str):
    """Re-raise a reader's low-level failure (torch's zip error, safetensors' header error, a short
    read) as one line naming the file and what it is."""
    from safetensors import SafetensorError
    try:
        yield
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointReadError(f"{path}: cannot read the {role} ({reason}); the file is truncated, "
                                  "corrupt or not a checkpoint") from err


# ---------------------------------------------------------------- open_clip state dicts

def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):  # DDP / DeepSpeed wrappers, torch.compile
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def to_open_clip_state_dict(sd: dict) -> dict:
    """Our state dict -> open_clip's: logit_scale [1] -> [], SLIP head dropped. Names are shared."""
    out = {k: v for k, v in _strip_prefixes(sd).items() if not k.startswith("image_mlp.")}
    if "logit_scale" in out:
        out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def from_open_clip_state_dict(sd: dict, model: CLIP | None = None, source: str = "state dict"):
    """open_clip's state dict -> ours (logit_scale [] -> [1]). With a model, load it strictly
    (a SLIP head keeps its initial weights) and return the model; raises CheckpointMismatchError."""
    out = _strip_prefixes(sd)
    if "logit_scale" in out:
        out["logit_scale"] = out["logit_scale"].reshape(1)
    if model is None:
        return out
    own = model.state_dict()
    for k in own:  # open_clip has no SLIP head: keep ours
        if k.startswith("image_mlp.") and k not in out:
            out[k] = own[k]
    load_strict(model, out, source)
    return model


def load_strict(model: torch.nn.Module, sd: dict, source: str):
    """load_state_dict with one readable error listing every missing, unexpected and misshaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        name = model.config.get("name", "?") if hasattr(model, "config") else type(model).__name__
        raise CheckpointMismatchError(source, name, missing, unexpected, shapes)
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------- our export

def tensors_sha256(sd: dict) -> str:
    """Checksum over names, dtypes, shapes and bytes of every tensor, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _atomic_write(path: Path, write):
    """write(tmp) then fsync + rename + fsync of the folder (common/io.py): a kill leaves no half file."""
    write_with(path, lambda tmp: write(Path(tmp)), sync_dir=True)


def _save_checked(sd: dict, path: Path, config: dict) -> None:
    """safetensors with our metadata (format, version, checksum of its tensors, model config), atomically."""
    import safetensors.torch
    meta = {"format": EXPORT_FORMAT, "format_version": str(EXPORT_VERSION),
            "sha256": tensors_sha256(sd), "config": json.dumps(config, sort_keys=True)}
    _atomic_write(path, lambda p: safetensors.torch.save_file(sd, str(p), metadata=meta))


def save_export(model: CLIP, config: dict | None, out_dir) -> Path:
    """Write the export (module docstring) atomically: one weights file, open_clip_model.safetensors, in
    fp32 with open_clip's names, which open_clip, CLIP_benchmark and load_checkpoint all read; a SLIP head
    goes to slip_head.safetensors. Returns the weights file's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = resolve_config(config if config is not None else model.config)
    sd = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
          for k, v in _strip_prefixes(model.state_dict()).items()}
    weights = out_dir / OPEN_CLIP_WEIGHTS
    _save_checked({k: v.contiguous() for k, v in to_open_clip_state_dict(sd).items()}, weights, config)
    head = {k: v for k, v in sd.items() if k.startswith("image_mlp.")}
    if head:
        _save_checked(head, out_dir / SLIP_HEAD_WEIGHTS, config)
    hub = json.dumps(open_clip_hub_config(config), indent=2) + "\n"
    _atomic_write(out_dir / OPEN_CLIP_CONFIG, lambda p: p.write_text(hub))
    _atomic_write(out_dir / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return weights


def open_clip_hub_config(config: dict) -> dict:
    """open_clip_config.json for a config: open_clip's model_cfg (our keys are open_clip's; the SLIP head
    and trainer-only keys dropped) and the eval preprocessing (bicubic shortest-side resize, centre crop)."""
    ours_only = {"name", "slip", "slip_mlp_dim", "slip_out_dim", "grad_checkpointing"}
    model_cfg = {k: v for k, v in resolve_config(config).items() if k not in ours_only}
    preprocess_cfg = {"size": model_cfg["vision_cfg"]["image_size"], "mode": "RGB", "mean": list(IMAGE_MEAN),
                      "std": list(IMAGE_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def _export_metadata(weights: Path) -> dict:
    """The safetensors header's metadata ({} for a file save_export did not write)."""
    from safetensors import safe_open
    with reading(weights, "exported weights (safetensors)"):
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
    return meta if meta.get("format") == EXPORT_FORMAT else {}


def export_weights(path: Path) -> Path | None:
    """An export directory's weights file: open_clip_model.safetensors with our metadata (version 2), else
    model.safetensors (version 1); None when the directory is not our export."""
    if (path / OPEN_CLIP_WEIGHTS).is_file() and _export_metadata(path / OPEN_CLIP_WEIGHTS):
        return path / OPEN_CLIP_WEIGHTS
    return path / WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() else None


def _load_checked(weights: Path, meta: dict) -> dict:
    import safetensors.torch
    with reading(weights, "exported weights (safetensors)"):
        sd = safetensors.torch.load_file(str(weights))
    digest = tensors_sha256(sd)
    if digest != meta.get("sha256"):
        raise ValueError(f"{weights}: checksum mismatch (stored {meta.get('sha256')}, "
                         f"computed {digest}): the file is corrupt or was modified")
    return sd


def _load_export(path: Path):
    """An export directory or weights file -> (model, info); None for a safetensors file without our
    metadata (a plain open_clip file)."""
    weights = export_weights(path) if path.is_dir() else path
    meta = _export_metadata(weights)
    if not meta:
        return None
    version = int(meta.get("format_version", -1))
    if version > EXPORT_VERSION:
        raise ValueError(f"{weights}: format_version {version} is newer than this code ({EXPORT_VERSION})")
    sd = _load_checked(weights, meta)
    config_file = weights.with_name(CONFIG_NAME)
    config = json.loads(config_file.read_text()) if config_file.is_file() else json.loads(meta["config"])
    model = build_model(config)
    if version >= 2:  # open_clip's names and logit_scale shape; the SLIP head sits beside
        head_file = weights.with_name(SLIP_HEAD_WEIGHTS)
        if head_file.is_file():
            sd.update(_load_checked(head_file, _export_metadata(head_file)))
        sd = from_open_clip_state_dict(sd)
    load_strict(model, sd, str(weights))
    return model, {"format": "export", "path": str(weights), "config": model.config,
                   "format_version": version, "sha256": meta["sha256"]}


# ---------------------------------------------------------------- DeepSpeed

def _deepspeed_config(tag_dir: Path, model_name):
    if model_name is not None:
        return get_config(model_name)
    for cand in (tag_dir / "export" / CONFIG_NAME, tag_dir / CONFIG_NAME):
        if cand.is_file():
            return json.loads(cand.read_text())
    raise ValueError(f"{tag_dir}: no model config found (looked for export/config.json and config.json); "
                     "pass model_name")


def _load_deepspeed(path: Path, model_name):
    if (path / "latest").is_file():  # the save_dir: resolve the tag DeepSpeed recorded
        path = path / (path / "latest").read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: DeepSpeed tag directory does not exist")
    if (path / "export").is_dir() and export_weights(path / "export"):  # train.py's copy: safe and fast
        model, info = _load_export(path / "export")
        return model, {**info, "format": "deepspeed", "deepspeed_tag_dir": str(path), "via": "export"}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    config = _deepspeed_config(path, model_name)
    if list(path.glob("*zero_pp_rank_*optim_states.pt")):
        with reading(path, "DeepSpeed ZeRO checkpoint (model and optimizer state shards)"):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:  # ZeRO stage 0: full weights sit in the model states file
        states_file = path / "mp_rank_00_model_states.pt"
        with reading(states_file, "DeepSpeed model states (ZeRO 0 weights)"):
            sd = torch.load(states_file, map_location="cpu", weights_only=True)["module"]
    model = build_model(config)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in _strip_prefixes(sd).items()}
    load_strict(model, sd, str(path))
    return model, {"format": "deepspeed", "path": str(path), "config": model.config, "via": "zero_to_fp32"}


# ---------------------------------------------------------------- entry point

def get_config(model_name) -> dict:
    from model.clip import get_model_config
    return get_model_config(model_name) if isinstance(model_name, str) else dict(model_name)


def _is_deepspeed_dir(path: Path) -> bool:
    return (path / "latest").is_file() or any(path.glob("*mp_rank_00_model_states.pt"))


def local_path(spec) -> Path:
    """local-dir:PATH (open_clip's name for a folder) -> PATH; a path as it is. hf-hub: names are
    downloaded first by model.hub.resolve_location (this module reads local files only)."""
    spec = str(spec)
    if spec.startswith("hf-hub:"):
        raise ValueError(f"{spec}: a hub name; resolve it with model.hub.resolve_location first")
    return Path(spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec)


def load_checkpoint(path, model_name: str | dict | None = None):
    """Load any supported checkpoint (module docstring) -> (model on CPU in fp32, eval mode, info)."""
    path = local_path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir() and _is_deepspeed_dir(path):
        model, info = _load_deepspeed(path, model_name)
    elif path.is_dir() and export_weights(path) is not None:
        loaded = _load_export(path)
        if loaded is None:
            raise ValueError(f"{path / WEIGHTS_NAME}: not written by save_export (no {EXPORT_FORMAT} "
                             "metadata); load it as an open_clip file with model_name")
        model, info = loaded
    elif path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file():
        model, info = _load_open_clip_hub(path)
    elif path.is_dir():
        raise ValueError(f"{path}: neither an export ({OPEN_CLIP_WEIGHTS} with {OPEN_CLIP_CONFIG}), an "
                         "open_clip hub folder nor a DeepSpeed checkpoint (latest / mp_rank_00_model_states.pt)")
    elif path.suffix == ".safetensors":
        loaded = _load_export(path)  # an export carries its own config; model_name is not needed
        if loaded is None:
            model, info = _load_open_clip(path, model_name)
        else:
            model, info = loaded
    else:
        model, info = _load_open_clip(path, model_name)
    return model.eval(), info


def _load_open_clip_hub(path: Path):
    """A directory in open_clip's hub layout (ours, or one downloaded from a hub): model_cfg from
    open_clip_config.json, weights from open_clip_model.safetensors (or open_clip_pytorch_model.bin)."""
    hub = json.loads((path / OPEN_CLIP_CONFIG).read_text())
    if "model_cfg" not in hub:
        raise ValueError(f"{path / OPEN_CLIP_CONFIG}: no model_cfg")
    weights = next((path / n for n in (OPEN_CLIP_WEIGHTS, "open_clip_pytorch_model.bin") if (path / n).is_file()), None)
    if weights is None:
        raise ValueError(f"{path}: {OPEN_CLIP_CONFIG} but no {OPEN_CLIP_WEIGHTS} or open_clip_pytorch_model.bin")
    model, info = _load_open_clip(weights, hub["model_cfg"])
    return model, {**info, "format": "open_clip_hub"}


def _load_open_clip(path: Path, model_name):
    if model_name is None:
        raise ValueError(f"{path}: an open_clip state dict carries no config; pass model_name "
                         "(one of model/configs) or a config dict")
    if path.suffix == ".safetensors":
        import safetensors.torch
        with reading(path, "open_clip state dict (safetensors)"):
            sd = safetensors.torch.load_file(str(path))
    else:
        with reading(path, "open_clip state dict (torch.save file)"):
            sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    model = build_model(get_config(model_name))
    from_open_clip_state_dict(sd, model, source=str(path))
    return model, {"format": "open_clip", "path": str(path), "config": model.config}
