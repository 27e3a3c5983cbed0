"""Weights people use: train.py's `pretrained:` start (an open_clip file + model name, an export or hub-layout
folder, local-dir:), one weights file per export, and the hub layout push/load (model/hub.py), tested
offline: the staged folder, huggingface_hub's own cache in offline mode, a refused connection, no token."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from common.ranks import free_port
from model import build_model
from model.checkpoint import load_checkpoint, save_export, to_open_clip_state_dict
from model.hub import stage
from tests.conftest import REPO
from tests.test_ecosystem import import_open_clip
from training.config import TrainConfig
from training.pretrained import PretrainedError, load_pretrained, start_weights

SHA = "0123456789abcdef0123456789abcdef01234567"  # the commit a hand-made hub cache entry is filed under


def trained_like(seed: int, **overrides):
    """A tiny CLIP whose weights differ from a fresh seed-0 build everywhere."""
    torch.manual_seed(seed)
    model = build_model({**build_model("tiny").config, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.05 * torch.randn_like(p))
    return model


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def env(tmp_path, **extra) -> dict:
    """No token, an empty hub cache and home of this test's own."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**e, "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def one_error_line(proc, prefix: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(prefix) and "Traceback" not in proc.stderr, proc.stderr
    return line


# ---------------------------------------------------------------- one weights file per export

def test_export_stores_the_weights_once(tmp_path):
    model = build_model("tiny")
    weights = save_export(model, None, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "open_clip_config.json", "open_clip_model.safetensors"]
    param_bytes = sum(v.numel() * 4 for v in model.state_dict().values())
    # the file is the fp32 tensors plus a JSON header (names, shapes, our config and checksum): a few KB
    assert param_bytes < weights.stat().st_size < param_bytes + 64 * 1024


# ---------------------------------------------------------------- pretrained: checks without a launch

def test_pretrained_mismatch_is_one_line_naming_the_file_and_first_keys(tmp_path):
    deeper = trained_like(1, vision_cfg={**build_model("tiny").config["vision_cfg"], "layers": 3})
    weights = save_export(deeper, None, tmp_path / "deeper")
    with pytest.raises(PretrainedError) as err:
        load_pretrained(f"local-dir:{tmp_path / 'deeper'}", build_model("tiny").config)
    message = str(err.value)
    assert "\n" not in message and str(weights) in message
    assert "unexpected keys (" in message and "visual.transformer.resblocks.2." in message
    torch.save(to_open_clip_state_dict(deeper.state_dict()), tmp_path / "deeper.pt")
    with pytest.raises(PretrainedError, match=r"deeper\.pt does not match model 'tiny': unexpected keys"):
        load_pretrained(str(tmp_path / "deeper.pt"), build_model("tiny").config)
    with pytest.raises(PretrainedError, match="does not exist"):
        load_pretrained(str(tmp_path / "nowhere.pt"), build_model("tiny").config)


def test_pretrained_sha256_is_recorded_and_pins_the_file(tmp_path):
    save_export(trained_like(1), None, tmp_path / "export")
    digest = sha256(tmp_path / "export" / "open_clip_model.safetensors")
    cfg = TrainConfig(data="synthetic", pretrained=f"local-dir:{tmp_path / 'export'}")
    sd, line = start_weights(cfg, build_model("tiny").config, resuming=False)
    assert cfg.pretrained_sha256 == digest and f"sha256 {digest}" in line and "WARNING" not in line
    cfg = TrainConfig(data="synthetic", pretrained=str(tmp_path / "export"), pretrained_sha256="0" * 64)
    with pytest.raises(PretrainedError, match="asks for pretrained_sha256=0000"):
        start_weights(cfg, build_model("tiny").config, resuming=False)
    sd, line = start_weights(cfg, build_model("tiny").config, resuming=True)
    assert sd is None and "not loaded: resuming from a checkpoint, which takes precedence" in line


def test_pretrained_warns_when_the_files_config_differs_without_changing_names(tmp_path):
    """quick_gelu changes the outputs but no weight name or shape: the start is allowed, the log says so."""
    save_export(trained_like(1, quick_gelu=True), None, tmp_path / "export")
    cfg = TrainConfig(data="synthetic", pretrained=str(tmp_path / "export"))
    _, line = start_weights(cfg, build_model("tiny").config, resuming=False)
    assert "WARNING, the file's model config differs: quick_gelu: True in the file, False in this run" in line


# ---------------------------------------------------------------- pretrained: train.py

def run_train(tmp_path, run_dir, *sets, resume=None, flags=()):
    args = [sys.executable, "train.py", "--config", "configs/train_tiny.yaml", *flags]
    for item in ["model=tiny", "data=synthetic", "synthetic_samples=64", "progress=false", "lr=0",
                 "total_steps=1", f"run_dir={run_dir}", *sets]:
        args += ["--set", item]
    args += ["--resume", resume] if resume else []
    return subprocess.run(args, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # launches train.py: 5.4 s and 10 s on 2 cores
@pytest.mark.parametrize("form", ["open_clip_file", "local_dir"])
def test_train_starts_from_pretrained_weights(tmp_path, form):
    """With lr=0 the step-1 export is the start weights, bit for bit: they reached the engine (ZeRO 1 and
    3), not a fresh build; train.log and config.yaml name the file and its sha256. local_dir also resumes: the
    checkpoint wins over pretrained, and the log says so."""
    source = trained_like(3)
    if form == "open_clip_file":  # open_clip's --model NAME --pretrained FILE
        weights = tmp_path / "open_clip.safetensors"
        safetensors.torch.save_file(to_open_clip_state_dict(source.state_dict()), str(weights))
        spec = str(weights)
    else:
        weights = save_export(source, None, tmp_path / "export")
        spec = f"local-dir:{tmp_path / 'export'}"
    run = tmp_path / "run"
    if form == "open_clip_file":  # open_clip_train's flag; ZeRO 3 partitions the loaded weights
        proc = run_train(tmp_path, run, "zero_stage=3", flags=["--pretrained", spec])
    else:
        proc = run_train(tmp_path, run, f"pretrained={spec}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    exported, _ = load_checkpoint(run / "checkpoints" / "step-0000001" / "export")
    for k, v in source.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v), k
    log = (run / "train.log").read_text()
    assert f"pretrained: {spec} -> {weights} " in log and f"sha256 {sha256(weights)}" in log, log
    assert yaml.safe_load((run / "config.yaml").read_text())["pretrained_sha256"] == sha256(weights)
    if form == "local_dir":
        proc = run_train(tmp_path, run, f"pretrained={spec}", "total_steps=2", resume="latest")
        assert proc.returncode == 0, proc.stderr[-4000:]
        log = (run / "train.log").read_text()
        assert "resumed from" in log and f"pretrained={spec} not loaded: resuming from a checkpoint" in log


def test_train_pretrained_mismatch_is_one_line_exit_2(tmp_path):
    weights = tmp_path / "narrower.pt"
    torch.save(to_open_clip_state_dict(trained_like(1, embed_dim=32).state_dict()), weights)
    proc = run_train(tmp_path, tmp_path / "run", f"pretrained={weights}")
    line = one_error_line(proc, f"train: error: pretrained={weights}: {weights} does not match model 'tiny': ")
    assert "shape mismatches (" in line and "text_projection" in line
    assert not (tmp_path / "run" / "config.yaml").exists()


# ---------------------------------------------------------------- hub layout: stage, load, push

@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = trained_like(2)
    save_export(model, None, root / "export")
    stage(root / "export", root / "staged", name="me/tiny")
    return model, root


def test_staged_folder_is_the_hub_layout_and_loads_in_open_clip_and_ours(staged):
    model, root = staged
    folder = root / "staged"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "open_clip_config.json", "open_clip_model.safetensors"]
    assert "library_name: open_clip" in (folder / "README.md").read_text()
    ours, info = load_checkpoint(f"local-dir:{folder}")
    assert info["format"] == "export"
    open_clip = import_open_clip()
    theirs = open_clip.create_model(f"local-dir:{folder}").eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(["a photo of a cat", "a red car"])
    images = torch.randn(2, 3, ours.image_size, ours.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.encode_image(images), model.encode_image(images))  # the same weights
        # open_clip's code: the tolerance of tests/test_ecosystem.py (the kernels' float rounding)
        torch.testing.assert_close(theirs.encode_text(tokens), model.encode_text(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.encode_image(images), model.encode_image(images), rtol=1e-5, atol=1e-5)


def hub_cache(root: Path) -> Path:
    """huggingface_hub's cache holding the staged folder as repository me/tiny (what a download leaves)."""
    cache = root / "hub-cache"
    repo = cache / "models--me--tiny"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in (root / "staged").iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    return cache


def test_hf_hub_name_loads_from_the_cache_offline_in_ours_and_open_clip(staged, tmp_path):
    model, root = staged
    import_open_clip()
    code = """
import torch, open_clip
from model.checkpoint import load_checkpoint
from model.hub import resolve_location
ours, info = load_checkpoint(resolve_location("hf-hub:me/tiny"))
theirs = open_clip.create_model("hf-hub:me/tiny").eval()
tokens = open_clip.get_tokenizer("hf-hub:me/tiny")(["a photo of a cat"])
with torch.no_grad():
    print(info["format"], torch.allclose(ours.encode_text(tokens), theirs.encode_text(tokens), rtol=1e-5, atol=1e-5))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env(tmp_path, HF_HUB_CACHE=str(hub_cache(root)), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["export", "True"]


@pytest.mark.slow  # four CLI runs: 7 s on 2 cores
def test_hub_failures_are_one_line(staged, tmp_path):
    _, root = staged
    push = [sys.executable, "-m", "model.hub", "push", str(root / "export"), "me/tiny"]
    proc = subprocess.run(push, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=60)
    one_error_line(proc, "model.hub: error: no Hugging Face token: set HF_TOKEN")
    no_network = env(tmp_path, HF_TOKEN="hf_test", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")  # refused
    proc = subprocess.run(push, cwd=REPO, env=no_network, capture_output=True, text=True, timeout=60)
    one_error_line(proc, "model.hub: error: push to me/tiny failed: ConnectError")
    proc = subprocess.run([sys.executable, "eval.py", "--checkpoint", "hf-hub:me/absent", "--datasets", "digits",
                           "--out", str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env(tmp_path, HF_HUB_OFFLINE="1"))
    one_error_line(proc, "eval.py: error: hf-hub:me/absent cannot be downloaded: LocalEntryNotFoundError")
    proc = subprocess.run([sys.executable, "-m", "model.hub", "stage", str(tmp_path), str(tmp_path / "o")],
                          cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=60)
    one_error_line(proc, f"model.hub: error: {tmp_path}: not an export in open_clip's hub layout")
