"""model/clip.py against open_clip (same random weights, same inputs), state-dict round trips,
checkpoint loading, activation checkpointing and torch.compile."""
import json
import math
import sys

import pytest
import torch

from common.ranks import free_port
from model import build_model
from model.checkpoint import (CheckpointMismatchError, from_open_clip_state_dict, load_checkpoint,
                              save_export, to_open_clip_state_dict)
from tests.conftest import REPO

torch.set_num_threads(1)


def import_open_clip():
    return pytest.importorskip("open_clip")  # as installed in .venv (scripts/setup.sh's torchvision guard)


def open_clip_model(ours):
    """open_clip CLIP built from the same config (paper configs by name, others from the dict)."""
    open_clip = import_open_clip()
    cfg = ours.config
    if cfg.get("name") in ("ViT-B-16", "ViT-B-32", "ViT-S-16") and not cfg["vision_cfg"]["qk_norm"]:
        return open_clip.create_model(cfg["name"], pretrained=None)
    drop = {"slip", "slip_mlp_dim", "slip_out_dim", "grad_checkpointing", "name", "init_logit_scale"}
    kwargs = {k: v for k, v in cfg.items() if k not in drop}
    return open_clip.model.CLIP(**kwargs)


def inputs(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    images = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.zeros(batch, 77, dtype=torch.long)
    for i in range(batch):  # sot, random ids, eot (largest id), zero padding; varied lengths
        n = 3 + 7 * i % 60
        tokens[i, 0] = 49406
        tokens[i, 1:n + 1] = torch.randint(1, 49405, (n,), generator=g)
        tokens[i, n + 1] = 49407
    return images, tokens


def randomise(model, seed=1):
    """Non-trivial weights everywhere (LayerNorm gains/biases included) so nothing is tested at init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.02 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name,overrides,batch", [
    ("tiny", {}, 4),
    ("tiny", {"vision_cfg": {"qk_norm": True}, "text_cfg": {"qk_norm": True}}, 4),
    ("tiny", {"quick_gelu": True}, 3),
    pytest.param("ViT-B-32", {}, 2, marks=pytest.mark.slow),  # full size: 8 s on 2 cores
])
def test_matches_open_clip(name, overrides, batch):
    torch.manual_seed(0)
    ours = build_model(name, **overrides).eval()
    randomise(ours)
    theirs = open_clip_model(ours).eval()
    theirs.load_state_dict(to_open_clip_state_dict(ours.state_dict()), strict=True)
    images, tokens = inputs(ours, batch)
    with torch.no_grad():
        ours_img, ours_txt = ours.encode_image(images), ours.encode_text(tokens)
        ref_img, ref_txt = theirs.encode_image(images), theirs.encode_text(tokens)
        feats = ours(images, tokens)
    assert ours_img.shape == ref_img.shape == (batch, ours.embed_dim)
    torch.testing.assert_close(ours_img, ref_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_txt, ref_txt, rtol=1e-4, atol=1e-5)
    assert feats[2].shape == (1,)
    torch.testing.assert_close(feats[2], theirs.logit_scale.exp().reshape(1))
    # and back: open_clip's state dict loads into a fresh model of ours with identical outputs
    again = build_model(name, **overrides).eval()
    from_open_clip_state_dict(theirs.state_dict(), again)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(tokens), ours_txt, rtol=0, atol=0)


def test_attention_function_on_cpu():
    from model.attention import attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    for causal in (False, True):
        scores = q @ k.transpose(-1, -2) / math.sqrt(8)
        if causal:
            scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
        torch.testing.assert_close(attention(q, k, v, causal=causal), scores.softmax(-1) @ v)


def test_logit_scale_init_and_clamp():
    m = build_model("tiny")
    assert m.logit_scale.shape == (1,)
    assert math.isclose(m.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    images, tokens = inputs(m, 2)
    assert m(images, tokens)[2].item() == pytest.approx(100.0)


def test_forward_shapes_multi_text_and_slip():
    m = build_model("tiny", slip=True)
    images, tokens = inputs(m, 3)
    img, txt, scale = m(images, tokens[:, None].expand(3, 2, 77))
    assert img.shape == (3, 64) and txt.shape == (3, 2, 64)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3, 2))
    torch.testing.assert_close(txt[:, 0], txt[:, 1])
    assert m.encode_image_ssl(images).shape == (3, 32)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = build_model("tiny")
    b = build_model("tiny", grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    images, tokens = inputs(a, 3)
    for m in (a, b):
        i, t, s = m(images, tokens)
        (s * i @ t.T).logsumexp(-1).sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_torch_compile_traces():
    # aot_eager traces forward and backward with dynamo/AOTAutograd without a C++ toolchain
    torch.manual_seed(0)
    m = build_model("tiny", grad_checkpointing=True).train()
    images, tokens = inputs(m, 2)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out = compiled(images, tokens)
    ref = m(images, tokens)
    for x, y in zip(out, ref):
        torch.testing.assert_close(x, y)
    out[0].sum().backward()


def test_export_roundtrip_and_checksum(tmp_path):
    m = build_model("tiny", slip=True)
    path = save_export(m, m.config, tmp_path / "export")
    # one weights file (open_clip's); the SLIP head, which open_clip has no place for, beside it
    assert path.name == "open_clip_model.safetensors"
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "config.json", "open_clip_config.json", "open_clip_model.safetensors", "slip_head.safetensors"]
    loaded, info = load_checkpoint(tmp_path / "export")
    assert info["format"] == "export" and loaded.config == m.config
    for k, v in m.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    # a flipped byte in the tensor data is caught by the checksum
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_checkpoint(path)


def test_version_1_export_still_loads(tmp_path):
    """An export written before the one-file layout: model.safetensors (our names, logit_scale [1], format
    metadata with format_version 1) beside open_clip's copy; eval.py and friends still read it."""
    import safetensors.torch
    from model.checkpoint import tensors_sha256
    m = build_model("tiny", slip=True)
    save_export(m, None, tmp_path / "v2")
    old = tmp_path / "v1"
    old.mkdir()
    for name in ("config.json", "open_clip_config.json"):
        (old / name).write_bytes((tmp_path / "v2" / name).read_bytes())
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    safetensors.torch.save_file({k: v.contiguous() for k, v in to_open_clip_state_dict(sd).items()},
                                str(old / "open_clip_model.safetensors"))  # no metadata in version 1
    safetensors.torch.save_file(sd, str(old / "model.safetensors"), metadata={
        "format": "laclip-export", "format_version": "1", "sha256": tensors_sha256(sd),
        "config": json.dumps(m.config, sort_keys=True)})
    for path in (old, old / "model.safetensors"):
        loaded, info = load_checkpoint(path)
        assert info["format"] == "export" and info["format_version"] == 1
        assert info["path"] == str(old / "model.safetensors")
        for k, v in m.state_dict().items():  # the SLIP head included
            assert torch.equal(loaded.state_dict()[k], v), k


def test_open_clip_files_and_mismatch_errors(tmp_path):
    import safetensors.torch
    m = build_model("tiny")
    sd = to_open_clip_state_dict(m.state_dict())
    assert sd["logit_scale"].shape == ()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "oc.pt")
    safetensors.torch.save_file(sd, str(tmp_path / "oc.safetensors"))
    for f in ("oc.pt", "oc.safetensors"):
        loaded, info = load_checkpoint(tmp_path / f, model_name="tiny")
        assert info["format"] == "open_clip"
        torch.testing.assert_close(loaded.logit_scale, m.logit_scale)
    with pytest.raises(ValueError, match="model_name"):
        load_checkpoint(tmp_path / "oc.pt")
    # wrong architecture: error names missing/unexpected keys and shape mismatches
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(tmp_path / "oc.safetensors", model_name="ViT-S-16")
    msg = str(err.value)
    assert "oc.safetensors" in msg and "shape" in msg and "missing" in msg
    assert "positional_embedding" in msg


DEEPSPEED_SCRIPT = r'''
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", OMP_NUM_THREADS="1")
import torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
from model import build_model
from model.losses import ClipLoss
out = sys.argv[1]
g = torch.Generator().manual_seed(0)
images, tokens = torch.randn(4, 3, 32, 32, generator=g), torch.randint(1, 49407, (4, 77), generator=g)
for stage in (0, 2, 3):
    torch.manual_seed(0)
    m = build_model("tiny")
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "zero_optimization": {"stage": stage}}
    eng, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
    eng.backward(ClipLoss()(*eng(images, tokens)))
    eng.step()
    eng.save_checkpoint(os.path.join(out, f"ds-z{stage}"), tag="step-0000001")
    with deepspeed.zero.GatheredParameters(list(eng.module.parameters()), enabled=stage == 3):
        torch.save({k: v.detach().clone() for k, v in eng.module.state_dict().items()},
                   os.path.join(out, f"z{stage}.pt"))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_deepspeed_checkpoints_load(tmp_path):
    """ZeRO 0, 2 and 3 checkpoints of one real training step (1 gloo rank) load to the engine's weights."""
    import subprocess
    pytest.importorskip("deepspeed")
    script = tmp_path / "ds.py"
    script.write_text(DEEPSPEED_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(free_port())],
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in (0, 2, 3):
        ref = torch.load(tmp_path / f"z{stage}.pt")  # the engine's weights after the step
        assert not torch.equal(ref["logit_scale"], torch.full((1,), math.log(1 / 0.07)))  # it trained
        for path in (tmp_path / f"ds-z{stage}", tmp_path / f"ds-z{stage}" / "step-0000001"):
            model, info = load_checkpoint(path, model_name="tiny")
            assert info["format"] == "deepspeed"
            got = model.state_dict()
            for k, v in ref.items():
                torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=f"stage {stage} {k}")
    with pytest.raises(ValueError, match="model_name"):  # no config anywhere near this checkpoint
        load_checkpoint(tmp_path / "ds-z2")
    # train.py's layout: <tag>/config.json is the model config; <tag>/export/ is preferred when present
    (tmp_path / "ds-z2" / "step-0000001" / "config.json").write_text(json.dumps(build_model("tiny").config))
    model, info = load_checkpoint(tmp_path / "ds-z2")
    assert info["via"] == "zero_to_fp32"
    save_export(model, None, tmp_path / "ds-z2" / "step-0000001" / "export")
    again, info = load_checkpoint(tmp_path / "ds-z2")
    assert info["format"] == "deepspeed" and info["via"] == "export"
    torch.testing.assert_close(again.state_dict(), model.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-S-16"])
def test_paper_configs_have_open_clip_names_and_shapes(name):
    open_clip = import_open_clip()
    ours = {k: tuple(v.shape) for k, v in to_open_clip_state_dict(build_model(name).state_dict()).items()}
    theirs = {k: tuple(v.shape) for k, v in open_clip.create_model(name, pretrained=None).state_dict().items()}
    assert ours == theirs


def test_tiny_overfits_a_batch_in_seconds():
    torch.manual_seed(0)
    from model.losses import ClipLoss
    m = build_model("tiny").train()
    images, tokens = inputs(m, 16)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = ClipLoss()(*m(images, tokens))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0 and losses[-1] < 0.3 * losses[0], losses
