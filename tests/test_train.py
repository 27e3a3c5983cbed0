"""train.py end to end on CPU: the real deepspeed launcher with 2 gloo ranks against 1-process runs of the
same global batch (ZeRO 1/2/3, gradient-cache accumulation, CLIP / LaCLIP-MT / SLIP losses): losses, and
gradient norms (step 1 to 1e-5 relative: a uniform gradient scale error, which AdamW's update hides from
the losses, shows in the norm); the launcher's death -> checkpoint + exact resume, the non-finite-loss stop,
and a short run on real packed data.

Launching is the cost (about 10 s per deepspeed launch), so each launch checks several things.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from common.ranks import free_port
from loaders.synthetic import SyntheticLoader
from tests.conftest import REPO
from training.engine import lr_lambda, param_groups

TOL = 2e-4  # fp32 losses of 1 vs 2 ranks differ by reduction order only (observed ~1e-6)
# Gradient norms, relative. Step 1 is taken at identical weights, so only the fp32 reduction order
# differs (observed ~1e-6): a uniform gradient-scale error (a wrong 1/ranks or accumulation factor) fails
# it. From step 2 the weights themselves differ: AdamW's first updates are about lr * sign(grad), so an
# element whose gradient is near zero can move the other way on one side, and the norms drift apart as
# steps go on (measured up to 1.8e-4 at step 4 under ZeRO 3 + SLIP); later steps get 10x that drift.
GRAD_REL_FIRST = 1e-5
GRAD_REL_LATER = 2e-3
# Every run: the tiny model on synthetic data; a long cosine so the 6-8 steps run at nearly peak lr.
COMMON = ["model=tiny", "data=synthetic", "synthetic_samples=1024", "lr=1e-3", "warmup_steps=2",
          "total_steps=10000", "checkpoint_every=0", "progress=false", "precision=fp32", "seed=0",
          "text_mode=rewrite", "image_loss=clip", "accumulation=1", "zero_stage=1"]


def _command(run_dir, sets, ranks, resume):
    args = ["train.py", "--config", "configs/train_tiny.yaml"]
    for item in COMMON + [f"run_dir={run_dir}"] + list(sets):
        args += ["--set", item]
    if resume:
        args += ["--resume", resume]
    if ranks == 1:
        return [sys.executable] + args
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(free_port())] + args


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def deepspeed_shm_segments() -> set:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def run_train(run_dir, *sets, ranks=1, resume=None, expect_rc=0, timeout=240):
    before = deepspeed_shm_segments()
    proc = subprocess.run(_command(run_dir, sets, ranks, resume), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, f"rc {proc.returncode} != {expect_rc}:\n{out[-6000:]}"
    # DeepSpeed's 69 MB per-rank /dev/shm buffers must not outlive a run (they filled /dev/shm)
    assert deepspeed_shm_segments() <= before, deepspeed_shm_segments() - before
    return out


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> list[float]:
    return [row["loss"] for row in metrics(run_dir)]


def grad_norms(run_dir) -> list[float]:
    return [row["grad_norm"] for row in metrics(run_dir)]


def assert_grad_norms_close(run_dir, ref_dir):
    """Gradient norms (before clipping) step by step: step 1 tightly, later steps within the drift."""
    got, want = grad_norms(run_dir), grad_norms(ref_dir)[:len(grad_norms(run_dir))]
    assert len(got) == len(want) and all(g is not None for g in got), (got, want)
    rel = [abs(a - b) / b for a, b in zip(got, want)]
    assert rel[0] <= GRAD_REL_FIRST, f"step-1 norms differ by {rel[0]:.2e}:\n got  {got}\n want {want}"
    worst = max(rel[1:], default=0.0)
    assert worst <= GRAD_REL_LATER, f"gradient norms differ by {worst:.2e} relative:\n got  {got}\n want {want}"


def assert_close(got, want, tol=TOL):
    assert len(got) == len(want), (got, want)
    diffs = [abs(a - b) for a, b in zip(got, want)]
    assert max(diffs) <= tol, f"losses differ by {max(diffs):.2e}:\n got  {got}\n want {want}"


# ----------------------------------------------------------------------------- in-process units

def test_config_yaml_and_overrides(tmp_path):
    cfg = train.load_config(str(REPO / "configs/train_tiny.yaml"),
                            ["lr=1e-3", "zero_stage=3", "betas=[0.9, 0.95]", "run_dir=/x/y",
                             "model_overrides={vision_cfg: {qk_norm: true}}"])
    assert (cfg.lr, cfg.zero_stage, cfg.betas, cfg.run_dir) == (1e-3, 3, (0.9, 0.95), "/x/y")
    assert cfg.model_overrides == {"vision_cfg": {"qk_norm": True}}
    gpu = train.load_config(str(REPO / "configs/train_vit_b16_32k.yaml"), [])
    assert gpu.micro_batch * gpu.accumulation * 32 == 32768 and gpu.precision == "bf16"
    with pytest.raises(ValueError, match="unknown config key 'lrr' from --set"):
        train.load_config(None, ["lrr=1"])
    with pytest.raises(ValueError, match="text_mode"):
        train.load_config(None, ["text_mode=bogus"])
    with pytest.raises(ValueError, match="'micro_batch' from --set: cannot read 'abc' as int"):
        train.load_config(None, ["micro_batch=abc"])


def test_schedule_and_param_groups():
    cfg = train.TrainConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    from model import build_model
    model = build_model("tiny")
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "token_embedding.weight", "positional_embedding",
            "visual.class_embedding", "visual.ln_pre.weight", "visual.ln_pre.bias"} <= no_decay_names
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    assert {"text_projection", "visual.proj", "visual.conv1.weight"} <= {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0


def test_synthetic_global_batch_is_split_invariant():
    """A step's global batch is the same set of samples for any ranks x accumulation x micro split."""
    def step_images(world, micro, accumulation, step):
        cfg = train.TrainConfig(micro_batch=micro, synthetic_samples=256)
        rows = []
        for rank in range(world):
            it = iter(SyntheticLoader(cfg, rank, world, 8, epoch=0, start_batch=step * accumulation))
            rows += [next(it)["images"] for _ in range(accumulation)]
        return sorted(torch.cat(rows).flatten(1).sum(1).tolist())
    assert step_images(1, 16, 1, 2) == step_images(2, 2, 4, 2) == step_images(2, 4, 2, 2)


def test_slip_head_in_bf16_like_deepspeed_casts_it():
    """DeepSpeed's bf16 casts parameters, not buffers: SLIP's batch norm gets bf16 weights and fp32
    running statistics (this raised 'expected scalar type BFloat16 but found Float' on CPU)."""
    from model import build_model
    torch.manual_seed(0)
    model = build_model("tiny", slip=True).train()
    views = torch.randn(8, 3, model.image_size, model.image_size)
    want = model.encode_image_ssl(views)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    got = model.encode_image_ssl(views.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and model.image_mlp.bn1.running_mean.dtype == torch.float32
    torch.testing.assert_close(got.float(), want.detach(), rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- 1-process references

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def ref_rewrite(runs):
    run_train(runs / "ref_rewrite", "micro_batch=16", "stop_after=6")
    return losses(runs / "ref_rewrite")


@pytest.fixture(scope="module")
def ref_slip(runs):
    run_train(runs / "ref_slip", "micro_batch=16", "image_loss=slip", "stop_after=8")
    return losses(runs / "ref_slip")


Z1_ACC = ["micro_batch=4", "accumulation=2", "zero_stage=1"]  # 2 ranks x 2 x 4 = the reference's 16


@pytest.fixture(scope="module")
def z1_acc(runs, ref_rewrite):
    """2 ranks, ZeRO 1, 2 micro batches of 4 per rank with the gradient cache."""
    run_dir = runs / "z1_acc"
    run_train(run_dir, *Z1_ACC, "stop_after=6", ranks=2)
    return run_dir


@pytest.mark.slow
def test_one_process_accumulation_equals_big_batch(runs, ref_rewrite):
    """4 micro batches of 4 with the gradient cache == 1 batch of 16, loss for loss, gradient for
    gradient."""
    run_train(runs / "acc4", "micro_batch=4", "accumulation=4", "stop_after=6")
    assert_close(losses(runs / "acc4"), ref_rewrite)
    assert_grad_norms_close(runs / "acc4", runs / "ref_rewrite")
    assert ref_rewrite[-1] < ref_rewrite[0]


# ----------------------------------------------------------------------------- 2 ranks

@pytest.mark.slow
def test_two_ranks_zero1_accumulation_matches_one_process(runs, z1_acc, ref_rewrite):
    assert_close(losses(z1_acc), ref_rewrite)
    assert_grad_norms_close(z1_acc, runs / "ref_rewrite")
    rows = metrics(z1_acc)
    assert set(rows[0]) >= {"step", "loss", "lr", "logit_scale", "grad_norm", "samples_per_s", "data_wait"}
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["lr"] == pytest.approx(5e-4) and rows[1]["lr"] == pytest.approx(1e-3)
    assert rows[0]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assert all(0 <= r["data_wait"] < 1 for r in rows)
    assert list((z1_acc / "tensorboard").glob("events.out.tfevents.*"))
    saved = train.load_config(str(z1_acc / "config.yaml"), [])
    assert (saved.accumulation, saved.micro_batch, saved.stop_after) == (2, 4, 6)


@pytest.mark.slow
def test_two_ranks_zero3_slip_accumulation_matches_one_process(runs, ref_slip):
    """SLIP with 2 ranks x 2 micro batches of 4 under ZeRO 3 == 1 batch of 16: the gradient cache runs
    SLIP's head once on the whole batch, whose batch norm normalises over both ranks' rows (per micro
    batch it would not: step 1's loss was 18% off); the head reads the image tower through its forward,
    so ZeRO 3 gathers it."""
    run_train(runs / "z3_slip", "micro_batch=4", "accumulation=2", "image_loss=slip", "zero_stage=3",
              "stop_after=4", ranks=2)
    assert_close(losses(runs / "z3_slip"), ref_slip[:4])
    assert_grad_norms_close(runs / "z3_slip", runs / "ref_slip")


@pytest.mark.slow
def test_two_ranks_zero2_accumulation_laclip_mt(runs):
    """LaCLIP-MT (all texts, masks): 2 ranks x 4 micro batches of 2 under ZeRO 2 == 1 batch of 16."""
    run_train(runs / "ref_all", "micro_batch=16", "text_mode=all", "stop_after=4")
    run_train(runs / "z2_all", "micro_batch=2", "accumulation=4", "text_mode=all", "zero_stage=2",
              "stop_after=4", ranks=2)
    assert_close(losses(runs / "z2_all"), losses(runs / "ref_all"))
    assert_grad_norms_close(runs / "z2_all", runs / "ref_all")


@pytest.mark.slow
def test_two_ranks_zero3_accumulation_and_export(runs, ref_rewrite):
    """ZeRO 3 with 2 micro batches of 4 per rank and activation checkpointing == 1 batch of 16; the
    consolidated export equals DeepSpeed's own zero_to_fp32 consolidation and loads with
    model.checkpoint.load_checkpoint."""
    run_dir = runs / "z3"
    run_train(run_dir, "micro_batch=4", "accumulation=2", "zero_stage=3", "grad_checkpointing=true",
              "stop_after=6", ranks=2)
    assert_close(losses(run_dir), ref_rewrite)
    assert_grad_norms_close(run_dir, runs / "ref_rewrite")

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from model.checkpoint import load_checkpoint
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-0000006"
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="step-0000006")
    model, info = load_checkpoint(ckpt / "step-0000006" / "export")
    exported = model.state_dict()
    assert set(exported) == set(reference)
    for k, v in reference.items():
        torch.testing.assert_close(exported[k], v.float(), rtol=0, atol=0, msg=k)
    assert 0 <= exported["logit_scale"].item() <= math.log(100)
    assert json.loads((ckpt / "step-0000006" / "export" / "config.json").read_text())["embed_dim"] == 64


def _start_two_ranks_past_step_1(run_dir):
    """A 2-rank run (bounded at 200 steps if no stop comes), once its first step is logged: (the
    deepspeed runner's process, every process under it, the two ranks among them)."""
    import psutil
    cmd = _command(run_dir, [*Z1_ACC, "stop_after=200"], 2, None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not ((run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 1):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-4000:]
            time.sleep(0.05)
        tree = psutil.Process(proc.pid).children(recursive=True)
    except BaseException:
        proc.kill()
        raise
    ranks = [p for p in tree if any(a.startswith("--local_rank") for a in p.cmdline())]
    assert len(ranks) == 2
    return proc, tree, ranks


def _kill_all(proc, tree) -> None:
    """Orphans are no longer our children: kill what was recorded."""
    if proc.poll() is None:
        proc.kill()
    for p in tree:
        if p.is_running():
            p.kill()


@pytest.mark.slow
def test_launcher_sigterm_checkpoints_and_resume_is_exact(runs, z1_acc):
    """SIGTERM to the deepspeed runner (which installs no handler and dies at once) mid-run: the ranks
    notice their launcher is gone, checkpoint at the next step boundary and exit; the resumed run's
    losses equal the uninterrupted run's bit for bit (model, optimizer, schedule, data position)."""
    import psutil
    run_dir = runs / "sigterm"
    proc, tree, ranks = _start_two_ranks_past_step_1(run_dir)
    try:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)  # EOF once the ranks (the pipe's last writers) exit
        gone, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, f"ranks {[p.pid for p in alive]} outlived their launcher"
    finally:
        _kill_all(proc, tree)
    assert "launcher process" in out and "stopped by the launcher's exit after step" in out, out[-4000:]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    k = int(tag.split("-")[1])
    assert 1 <= k < 200 and len(metrics(run_dir)) == k
    assert (run_dir / "checkpoints" / tag / "export" / "open_clip_model.safetensors").is_file()

    # How many steps pass before the ranks notice depends on the machine's speed: resume to at least
    # one step past the stop, against an uninterrupted run at least as long
    end = max(6, k + 1)
    reference = z1_acc
    if end > 6:
        reference = runs / f"z1_acc_{end}"
        run_train(reference, *Z1_ACC, f"stop_after={end}", ranks=2)
    run_train(run_dir, *Z1_ACC, f"stop_after={end}", ranks=2, resume="latest")
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, end + 1))
    assert losses(run_dir) == losses(reference)
    assert grad_norms(run_dir) == grad_norms(reference)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_and_says_why(runs):
    """SIGTERM to rank 1 only (a scheduler signalling one task): both ranks checkpoint at the same step
    boundary and stop, and rank 0, which prints the status, names the reason it did not see itself."""
    run_dir = runs / "sigterm_rank1"
    proc, tree, ranks = _start_two_ranks_past_step_1(run_dir)
    try:
        rank1 = [p for p in ranks if "--local_rank=1" in p.cmdline()]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        _kill_all(proc, tree)
    assert proc.returncode == 0 and "stopped by SIGTERM after step" in out, out[-4000:]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert int(tag.split("-")[1]) == len(metrics(run_dir))


@pytest.mark.slow
def test_nonfinite_loss_stops_with_step_and_checkpoint(runs):
    """lr=1e30: step 1 is fine, its update blows the weights up, step 2's loss is not finite."""
    run_dir = runs / "nan"
    out = run_train(run_dir, "micro_batch=8", "lr=1e30", "warmup_steps=1", "checkpoint_every=1",
                    expect_rc=train.EXIT_NONFINITE)
    assert "non-finite loss at step 2; last good checkpoint:" in out
    assert str(run_dir / "checkpoints" / "step-0000001") in out
    assert len(metrics(run_dir)) == 1 and (run_dir / "checkpoints" / "latest").read_text().strip() == "step-0000001"


# ----------------------------------------------------------------------------- real data

@pytest.mark.slow
def test_short_run_on_real_packed_data_lowers_the_loss(tmp_path):
    """253 real emoji images with their names, packed by packing.pack, read by the torch loader;
    the tiny model in bf16 memorises them: the loss falls clearly within 60 steps."""
    from packing import builders
    from packing.pack import PackConfig, pack
    folder = builders.build_dataset("emoji", str(tmp_path / "emoji"), max_samples=256, image_size=64)
    packed = tmp_path / "packed"
    pack(PackConfig(input=folder, out=str(packed), max_side=48, quality=90, workers=2))
    run_dir = tmp_path / "run"
    run_train(run_dir, "data=torch", f"data_root={packed}", "num_workers=0", "micro_batch=32",
              "precision=bf16", "lr=2e-3", "warmup_steps=5", "total_steps=60")
    got = losses(run_dir)
    assert len(got) == 60 and all(math.isfinite(x) for x in got)
    first, last = sum(got[:5]) / 5, sum(got[-10:]) / 10
    assert last < 0.7 * first, (first, last, got)
    assert metrics(run_dir)[-1]["epoch"] >= 1  # crossed epochs (7 batches of 32 per epoch)


@pytest.mark.slow
def test_weighted_caption_draw_reaches_the_loader(tmp_path):
    """caption_p_original / caption_style_weights go from the train config to the loader's draw: with the
    original drawn with probability 1, LaCLIP's run is CLIP's step for step; with 0 it is not."""
    from packing import builders
    from packing.pack import PackConfig, pack
    folder = builders.build_dataset("emoji", str(tmp_path / "emoji"), max_samples=64, image_size=48)
    rows = [json.loads(line) for line in open(Path(folder) / "captions.jsonl")]
    rewrites = tmp_path / "rw.jsonl"
    rewrites.write_text("".join(json.dumps({"key": r["key"], "rewrites": [f"an emoji: {r['caption']}",
                                                                          f"a small {r['caption']} icon"]}) + "\n"
                                for r in rows))
    packed = tmp_path / "packed"
    pack(PackConfig(input=folder, out=str(packed), rewrites=str(rewrites), max_side=32, workers=1))
    common = ["data=torch", f"data_root={packed}", "num_workers=0", "micro_batch=16", "total_steps=3"]
    run_train(tmp_path / "clip", *common, "text_mode=original")
    run_train(tmp_path / "always", *common, "caption_p_original=1.0")
    run_train(tmp_path / "never", *common, "caption_p_original=0.0",
              "caption_style_weights={chatbot_a: 1, chatbot_b: 3}")
    assert losses(tmp_path / "always") == losses(tmp_path / "clip")
    assert losses(tmp_path / "never") != losses(tmp_path / "clip")
    bad = subprocess.run(_command(tmp_path / "bad", [*common, "caption_style_weights={poetry: 2}"], 1, None),
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "caption_style_weights" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    """benchmarks/train.py runs both sides and writes the documented keys (speed is not asserted)."""
    from benchmarks.train import main
    out = tmp_path / "train.json"
    result = main(["--model", "tiny", "--micro-batch", "8", "--steps", "1", "--warmup", "1",
                   "--repeats", "1", "--threads", "1", "--no-data", "--out", str(out)])
    assert json.loads(out.read_text())["ratio"] == result["ratio"] > 0
    assert {"ours_samples_per_s", "open_clip_samples_per_s", "ours_peak_memory_mib",
            "open_clip_peak_memory_mib"} <= set(result)
    why = "no xformers kernel for cpu tensors (it runs on CUDA only)"  # attention=auto on the CPU
    assert result["ours_attention_kernels"] == {t: {"kernel": "sdpa", "why": why} for t in ("image", "text")}
