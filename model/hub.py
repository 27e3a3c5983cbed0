"""An export on the Hugging Face hub, in open_clip's hub layout.

    python -m model.hub stage EXPORT_DIR OUT_DIR              # the folder `push` uploads, on disk
    python -m model.hub push EXPORT_DIR ORG/NAME [--private]  # needs a token (HF_TOKEN or `hf auth login`)

The uploaded repository loads as open_clip's `hf-hub:ORG/NAME` (create_model_and_transforms, CLIP_benchmark's
--model) and as ours (eval.py --checkpoint hf-hub:ORG/NAME, train.py pretrained=hf-hub:ORG/NAME), which
download it through huggingface_hub's cache (HF_HUB_OFFLINE=1: the cache only). A missing token, an
unreachable hub or an unknown repository is one line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from model.checkpoint import (CONFIG_NAME, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, SLIP_HEAD_WEIGHTS,
                              export_weights, local_path)

# what open_clip's hf-hub: reads (config, then the safetensors weights or the torch.save ones), and ours
HUB_FILES = (OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, "open_clip_pytorch_model.bin", CONFIG_NAME, SLIP_HEAD_WEIGHTS,
             "README.md")


class HubError(OSError):
    """A hub operation that cannot be done (no token, no network, no such repository): one line."""


def model_card(name: str) -> str:
    """README.md of the repository: open_clip's card header (library, task), how to load it."""
    return ("---\ntags:\n- clip\n- laclip\nlibrary_name: open_clip\npipeline_tag: zero-shot-image-classification\n"
            f"---\n# {name}\n\nA CLIP model trained with LaCLIP (rewritten captions), in open_clip's hub layout.\n\n"
            "```python\nimport open_clip\n"
            f"model, _, preprocess = open_clip.create_model_and_transforms('hf-hub:{name}')\n"
            f"tokenizer = open_clip.get_tokenizer('hf-hub:{name}')\n```\n")


def stage(export_dir, out_dir, name: str | None = None) -> Path:
    """Put in out_dir exactly what `push` uploads: the export's hub files (hard links where the file system
    allows, else copies) and a model card. Old exports (format_version 1) stage their open_clip file."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if not ((export_dir / OPEN_CLIP_CONFIG).is_file() and (export_dir / OPEN_CLIP_WEIGHTS).is_file()):
        raise HubError(f"{export_dir}: not an export in open_clip's hub layout (needs {OPEN_CLIP_CONFIG} and "
                       f"{OPEN_CLIP_WEIGHTS}; train.py writes one in checkpoints/step-*/export)")
    out_dir.mkdir(parents=True, exist_ok=True)
    one_file = export_weights(export_dir) == export_dir / OPEN_CLIP_WEIGHTS
    for file in HUB_FILES:
        src, dst = export_dir / file, out_dir / file
        if not src.is_file() or (file == CONFIG_NAME and not one_file):
            continue  # a version 1 config.json describes model.safetensors, which is not uploaded
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # another file system
            shutil.copy2(src, dst)
    if not (out_dir / "README.md").is_file():
        (out_dir / "README.md").write_text(model_card(name or export_dir.resolve().name))
    return out_dir


def _token() -> str:
    from huggingface_hub import get_token
    token = get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token)")
    return token


def _hub_failure(err: Exception, what: str) -> HubError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return HubError(f"{what}: {type(err).__name__}: {reason}")


def _hub_errors() -> tuple:
    from huggingface_hub import errors
    # errors.HTTPError: the base class of whichever HTTP client huggingface_hub uses (a refused connection)
    return (errors.HTTPError, errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError,
            errors.HFValidationError, OSError, ValueError)


def push(export_dir, repo_id: str, private: bool = False, message: str = "Add LaCLIP model") -> str:
    """Create repo_id (if needed) and upload the staged export to it; returns the commit URL."""
    import tempfile
    from huggingface_hub import HfApi
    token = _token()
    with tempfile.TemporaryDirectory(prefix="hub-stage-") as tmp:
        folder = stage(export_dir, Path(tmp) / "repo", name=repo_id)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
        except _hub_errors() as err:
            raise _hub_failure(err, f"push to {repo_id} failed") from None
    return str(getattr(info, "commit_url", info))


def download(repo_id: str, revision: str | None = None) -> Path:
    """hf-hub:ORG/NAME -> the local folder of its hub files, through huggingface_hub's cache."""
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_FILES))
    except _hub_errors() as err:
        raise _hub_failure(err, f"hf-hub:{repo_id} cannot be downloaded") from None
    return Path(folder)


def resolve_location(spec) -> Path:
    """open_clip's model locations as paths: hf-hub:ORG/REPO[@REVISION] -> the downloaded hub-layout
    folder; local-dir:PATH -> PATH; anything else is a path."""
    spec = str(spec)
    if spec.startswith("hf-hub:"):
        repo, _, revision = spec[len("hf-hub:"):].partition("@")
        return download(repo, revision or None)
    return local_path(spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.hub", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stage", help="write the folder `push` uploads")
    s.add_argument("export_dir")
    s.add_argument("out_dir")
    s.add_argument("--name", help="the model card's repository name (default: the export folder's name)")
    u = sub.add_parser("push", help="upload an export to the Hugging Face hub")
    u.add_argument("export_dir")
    u.add_argument("repo_id", help="ORG/NAME")
    u.add_argument("--private", action="store_true")
    u.add_argument("--message", default="Add LaCLIP model", help="commit message")
    args = p.parse_args(argv)
    try:
        if args.command == "stage":
            print(stage(args.export_dir, args.out_dir, args.name))
        else:
            print(push(args.export_dir, args.repo_id, args.private, args.message))
    except HubError as err:
        print(f"model.hub: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
