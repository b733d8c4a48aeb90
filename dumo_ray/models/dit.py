"""The dual-head Diffusion Transformer of DuMo (method.md section 2).

One shared trunk (patchify, DiT blocks with adaLN-Zero conditioning), two heads read its last tokens:
`v` (instantaneous velocity, the multi-step quantity) and `u` (flow map / average velocity over
[r, t], the few-step quantity), both from one forward pass. Conditioning is the sum of three
embeddings: t, the interval t - r, and the class label (index `num_classes` is the null class used by
classifier-free guidance). The model knows nothing about losses.

The shapes follow DiT (facebookresearch/DiT); the building blocks are timm's PatchEmbed, Attention and
Mlp. timm's Attention calls torch's fused SDPA on the plain forward (flash / memory-efficient kernels
on GPU); forward-mode AD needs the math kernel, which `dumo_ray.flow.jvp` selects around the JVP only.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
from timm.layers import Attention, Mlp, PatchEmbed, build_sincos2d_pos_embed

from dumo_ray.model_presets import PRESETS  # the size registry: torch-free, shared with the config


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class ScalarEmbedder(nn.Module):
    """Embeds a scalar per sample (t or t - r) with sinusoids, then a 2-layer MLP.

    `scale` multiplies the scalar first. DiT uses t * 1000; we keep t on its [0, 1] scale (scale 1):
    at 1000 the network's derivative in t is inflated ~1000x and the JVP target becomes mostly noise.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, scale: float = 1.0, max_period: float = 10_000.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.scale = scale
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def sinusoids(self, s: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        dtype = torch.promote_types(s.dtype, torch.float32)  # at least fp32: sinusoids of t need the bits
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=s.device, dtype=dtype) / half)
        args = (s.to(dtype) * self.scale)[:, None] * freqs[None]  # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, frequency_size)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoids(s).to(self.mlp[0].weight.dtype))  # (N, D)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: the conditioning regresses shift/scale/gate."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN modulation + linear projection back to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


class Head(nn.Module):
    """One output head: `depth` private transformer blocks (0 by default) and a final layer."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, depth: int, patch_size: int, out_channels: int):
        super().__init__()
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c)
        return self.final_layer(x, c)


class DualHeadDiT(nn.Module):
    """`forward(x_t, t, r, y) -> (v, u)`, both shaped like `x_t`. t, r: (N,) floats in [0, 1], r <= t."""

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        head_depth: int = 0,
        time_scale: float = 1.0,
    ):
        super().__init__()
        if not 0 <= head_depth < depth:
            raise ValueError(f"head_depth must be in [0, {depth - 1}], got {head_depth}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.patch_size = patch_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = ScalarEmbedder(hidden_size, scale=time_scale)
        self.h_embedder = ScalarEmbedder(hidden_size, scale=time_scale)  # the interval h = t - r
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # last index: the null class
        num_patches = self.x_embedder.num_patches
        # Fixed 2-D sin-cos position embedding, kept out of the optimizer like DiT's.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth - head_depth)]
        )
        self.v_head = Head(hidden_size, num_heads, mlp_ratio, head_depth, patch_size, in_channels)
        self.u_head = Head(hidden_size, num_heads, mlp_ratio, head_depth, patch_size, in_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def initialize_weights(self) -> None:
        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier)
        grid = self.input_size // self.patch_size
        pos = build_sincos2d_pos_embed((grid, grid), dim=self.pos_embed.shape[-1], device="cpu")
        with torch.no_grad():
            self.pos_embed.copy_(pos.reshape(1, grid * grid, -1).to(self.pos_embed.dtype))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for embedder in (self.t_embedder, self.h_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, every head outputs zero.
        blocks = list(self.blocks) + list(self.v_head.blocks) + list(self.u_head.blocks)
        for module in blocks + [self.v_head.final_layer, self.u_head.final_layer]:
            nn.init.zeros_(module.adaLN_modulation[-1].weight)
            nn.init.zeros_(module.adaLN_modulation[-1].bias)
        for head in (self.v_head, self.u_head):
            nn.init.zeros_(head.final_layer.linear.weight)
            nn.init.zeros_(head.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.patch_size, self.in_channels
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x_embedder(x_t) + self.pos_embed  # (N, T, D), T = (H / p) * (W / p)
        c = self.t_embedder(t) + self.h_embedder(t - r) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        v = self.unpatchify(self.v_head(x, c))  # (N, C, H, W)
        u = self.unpatchify(self.u_head(x, c))  # (N, C, H, W)
        return v, u


def build_model(name: str, *, input_size: int, in_channels: int, num_classes: int, **overrides) -> DualHeadDiT:
    """A preset by name (e.g. `DuMo-XL/2`), with any constructor argument overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    kwargs = {**PRESETS[name], **overrides}
    return DualHeadDiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
