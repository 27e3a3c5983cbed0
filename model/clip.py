"""CLIP: a ViT image tower, a causal text transformer, projections to a shared space, a logit scale.

Parameter names and shapes follow open_clip's CLIP for the same JSON config (model/configs/*.json use
open_clip's config keys), so open_clip state dicts load with two conversions only (model/checkpoint.py):
logit_scale is [1] here and [] there (DeepSpeed cannot broadcast, shard or clip 0-dim parameters), and
the optional SLIP head (image_mlp.*) has no open_clip counterpart.

Config (one JSON dict):
  embed_dim                 shared embedding size D
  vision_cfg: image_size, patch_size, width, layers, head_width (64), mlp_ratio (4.0), qk_norm (false)
  text_cfg:   context_length (77), vocab_size (49408), width, heads, layers, mlp_ratio (4.0), qk_norm
  quick_gelu (false)        x*sigmoid(1.702x) as in OpenAI's weights; nn.GELU otherwise
  init_logit_scale          log(1/0.07)
  slip (false), slip_mlp_dim (4096), slip_out_dim (256)   SLIP's 3-layer MLP head on the image tower
  grad_checkpointing (false) recompute each block in backward (torch.utils.checkpoint)
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.config import merged
from model.attention import attention

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# The image normalisation every model here is trained and evaluated with (OpenAI CLIP's).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

VISION_DEFAULTS = {"head_width": 64, "mlp_ratio": 4.0, "qk_norm": False}
TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "mlp_ratio": 4.0, "qk_norm": False}
TOP_DEFAULTS = {"quick_gelu": False, "init_logit_scale": math.log(1 / 0.07), "slip": False,
                "slip_mlp_dim": 4096, "slip_out_dim": 256, "grad_checkpointing": False}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused in-projection (open_clip / nn.MultiheadAttention names)."""

    def __init__(self, width: int, heads: int, causal: bool, qk_norm: bool):
        super().__init__()
        assert width % heads == 0, f"width {width} not divisible by heads {heads}"
        self.heads, self.causal = heads, causal
        self.attention_mode, self.tower = "auto", ""  # CLIP.set_attention; the tower names kernel reports
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        # qk-norm: LayerNorm over each head's q and k before the dot product (stabilises large ViTs)
        self.ln_q = nn.LayerNorm(width // heads) if qk_norm else nn.Identity()
        self.ln_k = nn.LayerNorm(width // heads) if qk_norm else nn.Identity()
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(self.ln_q(q), self.ln_k(k), v, causal=self.causal, mode=self.attention_mode,
                        tower=self.tower)  # [b, heads, n, hd]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, mlp_ratio, causal, qk_norm, act):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal, qk_norm)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()  # named children so keys read mlp.c_fc.*, mlp.c_proj.*
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", act())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, causal, qk_norm, act):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, causal, qk_norm, act) for _ in range(layers))

    def forward(self, x):
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def init_weights(self):
        # GPT-2 style: residual-branch outputs scaled down with depth
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class VisionTransformer(nn.Module):
    """ViT: patchify conv, class token, learned positions, pre-LN, blocks, post-LN on the class token."""

    def __init__(self, image_size, patch_size, width, layers, head_width, mlp_ratio, qk_norm,
                 output_dim, act):
        super().__init__()
        assert image_size % patch_size == 0, f"image_size {image_size} % patch_size {patch_size} != 0"
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        grid = image_size // patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, width // head_width, mlp_ratio,
                                       causal=False, qk_norm=qk_norm, act=act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.transformer.init_weights()

    def pooled(self, images):
        """Class-token features after ln_post, before the projection: [B, width]."""
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0])

    def forward(self, images, pooled: bool = False):
        # SLIP's head reads the pooled features through forward too, so ZeRO-3 gathers this module.
        features = self.pooled(images)
        return features if pooled else features @ self.proj


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the whole data-parallel batch.

    Like SyncBatchNorm (which SLIP uses) but built on differentiable functional all-reduces, so it
    also runs on CPU/gloo and under torch.compile. Single process: identical to nn.BatchNorm1d.
    It normalises in fp32 and returns the input's dtype: under bf16, DeepSpeed casts the weights but
    not the running statistics, and bf16 sums of squares would lose most of their digits.
    """

    def forward(self, x):
        from model.losses import all_reduce_sum, world_size  # here: a module-level import is a cycle
        dtype = x.dtype
        x, weight, bias = x.float(), self.weight.float(), self.bias.float()  # no-ops in fp32
        if not self.training or world_size() == 1:
            if self.training:
                self.num_batches_tracked.add_(1)
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, self.training,
                                self.momentum, self.eps).to(dtype)
        stats = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), x.shape[0])])
        stats = all_reduce_sum(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean  # biased, used to normalise
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        return ((x - mean) * torch.rsqrt(var + self.eps) * weight + bias).to(dtype)


def slip_head(in_dim: int, mlp_dim: int, out_dim: int) -> nn.Sequential:
    """SLIP's 3-layer projection MLP for the SimCLR branch (names follow SLIP's _build_mlp)."""
    head = nn.Sequential()
    head.add_module("layer1", nn.Linear(in_dim, mlp_dim))
    head.add_module("bn1", GlobalBatchNorm1d(mlp_dim))
    head.add_module("relu1", nn.ReLU(inplace=True))
    head.add_module("layer2", nn.Linear(mlp_dim, mlp_dim))
    head.add_module("bn2", GlobalBatchNorm1d(mlp_dim))
    head.add_module("relu2", nn.ReLU(inplace=True))
    head.add_module("layer3", nn.Linear(mlp_dim, out_dim))
    return head


class CLIP(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_config(config)
        self.config = cfg
        vc, tc = cfg["vision_cfg"], cfg["text_cfg"]
        act = QuickGELU if cfg["quick_gelu"] else nn.GELU
        self.embed_dim = cfg["embed_dim"]
        self.context_length = tc["context_length"]

        self.visual = VisionTransformer(vc["image_size"], vc["patch_size"], vc["width"], vc["layers"],
                                        vc["head_width"], vc["mlp_ratio"], vc["qk_norm"],
                                        self.embed_dim, act)
        # text tower lives at the top level, as in open_clip
        self.token_embedding = nn.Embedding(tc["vocab_size"], tc["width"])
        self.positional_embedding = nn.Parameter(torch.empty(tc["context_length"], tc["width"]))
        self.transformer = Transformer(tc["width"], tc["layers"], tc["heads"], tc["mlp_ratio"],
                                       causal=True, qk_norm=tc["qk_norm"], act=act)
        self.ln_final = nn.LayerNorm(tc["width"])
        self.text_projection = nn.Parameter(torch.empty(tc["width"], self.embed_dim))
        # shape [1], not []: see module docstring
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg["init_logit_scale"])))
        if cfg["slip"]:
            self.image_mlp = slip_head(vc["width"], cfg["slip_mlp_dim"], cfg["slip_out_dim"])

        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=tc["width"] ** -0.5)
        self.transformer.init_weights()
        self.set_grad_checkpointing(cfg["grad_checkpointing"])
        for tower, module in (("image", self.visual), ("text", self.transformer)):
            for attn in module.modules():
                if isinstance(attn, SelfAttention):
                    attn.tower = tower

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    def set_grad_checkpointing(self, enable: bool = True):
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable
        self.config["grad_checkpointing"] = bool(enable)

    def set_attention(self, mode: str = "auto"):
        """The attention kernel of every block: auto | xformers | sdpa (model/attention.py). A run-time
        choice like the device, so not part of the config that exports save."""
        from model.attention import MODES
        if mode not in MODES:
            raise ValueError(f"attention mode {mode!r}, expected one of {MODES}")
        for attn in self.modules():
            if isinstance(attn, SelfAttention):
                attn.attention_mode = mode

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens [B, context] int: sot, ids, eot, zero padding. Pooled at the EOT token, which has the
        largest id in the CLIP vocabulary, hence argmax."""
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]
        x = self.ln_final(self.transformer(x))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image_ssl(self, images: torch.Tensor) -> torch.Tensor:
        """SLIP's SimCLR embedding of one augmented view: MLP head on the pooled image features."""
        if not hasattr(self, "image_mlp"):
            raise RuntimeError("encode_image_ssl needs a model built with slip=True")
        return self.image_mlp(self.visual(images, pooled=True))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at 100, shape [1]."""
        return self.logit_scale.exp().clamp(max=100)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """Returns (image features [B,D] L2-normalised, text features [N,D] L2-normalised, scale [1]).
        tokens may be [N,77] or [B,K,77] (LaCLIP-MT: K texts per image); the latter gives [B,K,D]."""
        image_features = self.encode_image(images, normalize=True)
        flat = tokens.reshape(-1, tokens.shape[-1])
        text_features = self.encode_text(flat, normalize=True)
        text_features = text_features.reshape(*tokens.shape[:-1], -1)
        return image_features, text_features, self.scale()


def list_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown model config {name!r}: no {path}; known: {list_models()}")
    cfg = json.loads(path.read_text())
    cfg.setdefault("name", name)
    return cfg


def resolve_config(config: dict) -> dict:
    """Fill defaults so the saved config is complete and self-describing."""
    cfg = merged(TOP_DEFAULTS, config)
    cfg["vision_cfg"] = merged(VISION_DEFAULTS, config["vision_cfg"])
    cfg["text_cfg"] = merged(TEXT_DEFAULTS, config["text_cfg"])
    unknown = set(cfg) - set(TOP_DEFAULTS) - {"name", "embed_dim", "vision_cfg", "text_cfg"}
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}")
    return cfg


def build_model(name: str | dict, **overrides) -> CLIP:
    """build_model("ViT-B-16"), build_model(config_dict), build_model("tiny", slip=True,
    vision_cfg={"qk_norm": True}); nested dicts in overrides are merged, not replaced."""
    cfg = get_model_config(name) if isinstance(name, str) else copy.deepcopy(name)
    return CLIP(merged(cfg, overrides))
