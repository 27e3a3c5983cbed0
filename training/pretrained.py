"""train.py's start weights (`pretrained:`), as open_clip_train's --pretrained: the run's architecture is
`model` (+ model_overrides), and the weights come from

  - an open_clip state dict file (.pt/.bin/.safetensors, open_clip's names, e.g. one open_clip downloaded),
  - an export or open_clip hub-layout folder, as a path or local-dir:PATH (open_clip's name for it),
  - hf-hub:ORG/NAME (model.hub downloads it), or one of our DeepSpeed checkpoints (weights only).

They are loaded on every rank before DeepSpeed wraps the model (its broadcast and ZeRO partitions see them);
the optimizer, schedule and data order start fresh. A resumed run ignores them: the checkpoint has the
weights and everything else. The file's path and sha256 go to train.log and, as pretrained_sha256, to the
run's config.yaml; a config that names a sha256 refuses any other file.
"""
from __future__ import annotations

import torch

SLIP_HEAD = "image_mlp."
OURS_ONLY = {"name", "slip", "slip_mlp_dim", "slip_out_dim", "grad_checkpointing"}  # not the architecture


class PretrainedError(ValueError):
    """The start weights cannot be used: missing, unreadable, another architecture, another sha256."""


def config_differences(source: dict, run: dict, prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ between two model configs, trainer-only keys left out: settings
    such as quick_gelu change the outputs without changing any weight's name or shape."""
    out = []
    for k in sorted(set(source) | set(run)):
        if not prefix and k in OURS_ONLY:
            continue
        a, b = source.get(k), run.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the file, {b!r} in this run")
    return out


def load_pretrained(spec: str, model_config: dict) -> tuple[dict, dict]:
    """-> (state dict for build_model(model_config): every weight but a SLIP head the source lacks,
    provenance {spec, path, sha256 or listing_sha256, format, config_differences})."""
    from evaluation.features import checkpoint_identity
    from model import build_model
    from model.checkpoint import CheckpointMismatchError, load_checkpoint, load_strict
    from model.hub import resolve_location
    try:
        location = resolve_location(spec)
        if not location.exists():
            raise PretrainedError(f"{location} does not exist")
        source, info = load_checkpoint(location, model_name=model_config)
        target = build_model(model_config)
        own = target.state_dict()
        # a SLIP head the run does not train is dropped; one the source lacks keeps the run's initial weights
        sd = {k: v for k, v in source.state_dict().items() if not k.startswith(SLIP_HEAD) or k in own}
        if info["format"] == "open_clip":  # the head load_checkpoint gave it is a fresh, unseeded one
            sd = {k: v for k, v in sd.items() if not k.startswith(SLIP_HEAD)}
        load_strict(target, {**{k: v for k, v in own.items() if k.startswith(SLIP_HEAD)}, **sd}, info["path"])
    except CheckpointMismatchError as err:
        raise PretrainedError(f"pretrained={spec}: {err.one_line()}") from None
    except (ValueError, OSError) as err:  # missing, unreadable, no config, hub unreachable
        raise PretrainedError(f"pretrained={spec}: {err}") from None
    identity = checkpoint_identity(info["path"])
    provenance = {"spec": spec, "format": info["format"], **identity,
                  "config_differences": config_differences(source.config, target.config)}
    return sd, provenance


def start_weights(cfg, model_config: dict, resuming: bool) -> tuple[dict | None, str | None]:
    """(the state dict to start from or None, the train.log line that says what happened). Sets
    cfg.pretrained_sha256 to the file's (written to config.yaml); raises PretrainedError."""
    if not cfg.pretrained:
        return None, None
    if resuming:
        return None, (f"pretrained={cfg.pretrained} not loaded: resuming from a checkpoint, which takes "
                      "precedence (it holds the trained weights)")
    sd, prov = load_pretrained(cfg.pretrained, model_config)
    digest = prov.get("sha256") or prov["listing_sha256"]
    if cfg.pretrained_sha256 and cfg.pretrained_sha256 != digest:
        raise PretrainedError(f"pretrained={cfg.pretrained}: {prov['path']} has sha256 {digest}, the config "
                              f"asks for pretrained_sha256={cfg.pretrained_sha256}")
    cfg.pretrained_sha256 = digest
    line = f"pretrained: {cfg.pretrained} -> {prov['path']} ({prov['format']}), sha256 {digest}"
    if prov["config_differences"]:
        line += "; WARNING, the file's model config differs: " + "; ".join(prov["config_differences"])
    return sd, line


def load_start_state(model: torch.nn.Module, sd: dict) -> None:
    """Load start weights checked by load_pretrained; only a SLIP head may be missing (it keeps its
    initial weights)."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    left = [k for k in missing if not k.startswith(SLIP_HEAD)]
    assert not left and not unexpected, (left, unexpected)  # load_pretrained checked these
