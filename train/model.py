"""Meissonic's masked-token MM-DiT in plain torch, with a registry of presets.

Architecture (Flux-style, as released with Meissonic): VQ code ids -> token embedding ->
[optional 2x2 down-compression] -> ``dual_blocks`` dual-stream blocks (image and text streams
with their own weights, one joint attention) -> ``single_blocks`` single-stream blocks over the
concatenated sequence -> [optional 2x2 up-compression] -> per-position logits over the codebook.
Conditioning: one vector per sample (``temb``) = embed(1000 x the mask-ratio condition) +
embed(pooled text + sinusoidal micro-conditions), fed to every block through AdaLN-Zero; what the
condition value is (this project's mask ratio, or the release's own inputs) is the run's
convention, ``train/convention.py``. Attention uses QK-RMSNorm
and 3-axis RoPE (see ``train/rope.py``).

Module and parameter names follow the released checkpoint exactly (diffusers naming), so
``model.load_state_dict(released, strict=True)`` works for ``meissonic-1b``; upstream quirks that
only exist for that reason (e.g. the empty ``net.1`` slot of the feed-forward) say so.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.rope import apply_rope, rope_cos_sin, rope_ids

__all__ = ["ModelConfig", "MODELS", "MeissonicTransformer", "build_model", "rope_ids",
           "load_without_compression", "compression_keys", "count_params", "compile_blocks"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Meissonic transformer. Defaults are the released 1B model (without compression)."""

    codebook_size: int = 8192          # real VQ codes = output classes of the logits
    vocab_size: int = 8256             # input ids: the codes + spare ids; the last id is the mask token
    hidden: int = 1024                 # model width; must equal heads * head_dim
    heads: int = 8                     # attention heads
    head_dim: int = 128                # width of one head; must equal sum(rope_axes)
    dual_blocks: int = 14              # dual-stream (image + text weights) MM-DiT blocks
    single_blocks: int = 28            # single-stream blocks over the joint sequence
    text_dim: int = 1024               # width of the text encoder's hidden states (B, T, text_dim)
    pooled_dim: int = 1024             # width of the pooled text vector (B, pooled_dim)
    micro_cond_dim: int = 5            # micro-conditions per sample: orig_w, orig_h, crop_top, crop_left, score
    micro_cond_embed_dim: int = 256    # sinusoidal width of EACH micro-condition
    timestep_embed_dim: int = 256      # sinusoidal width of the mask-ratio condition
    mlp_ratio: float = 4.0             # feed-forward width / hidden
    downsample: bool = False           # 2x2 down/up compression around the blocks (stage3 / 1024 px)
    rope_axes: tuple[int, int, int] = (16, 56, 56)  # head-dim split over the (axis0, row, col) ids
    rope_theta: float = 10000.0        # RoPE base
    eps: float = 1e-6                  # epsilon of every LayerNorm / RMSNorm

    def __post_init__(self) -> None:
        for name in ("codebook_size", "hidden", "heads", "head_dim", "text_dim", "pooled_dim",
                     "micro_cond_embed_dim", "timestep_embed_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.dual_blocks < 0 or self.single_blocks < 0 or self.dual_blocks + self.single_blocks == 0:
            raise ValueError("ModelConfig needs dual_blocks, single_blocks >= 0 and at least one block")
        if self.vocab_size <= self.codebook_size:
            raise ValueError(f"vocab_size ({self.vocab_size}) must exceed codebook_size "
                             f"({self.codebook_size}): the mask id is vocab_size - 1, outside the codebook")
        if self.hidden != self.heads * self.head_dim:
            raise ValueError(f"hidden ({self.hidden}) must equal heads * head_dim ({self.heads}*{self.head_dim})")
        if sum(self.rope_axes) != self.head_dim or any(a <= 0 or a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be positive even numbers summing to "
                             f"head_dim ({self.head_dim})")
        if self.micro_cond_dim < 0 or self.mlp_ratio <= 0 or self.eps <= 0 or self.rope_theta <= 0:
            raise ValueError("micro_cond_dim >= 0, mlp_ratio > 0, eps > 0 and rope_theta > 0 are required")
        if self.timestep_embed_dim % 2 or self.micro_cond_embed_dim % 2:
            raise ValueError("timestep_embed_dim and micro_cond_embed_dim must be even (cos + sin halves)")

    @property
    def mask_token_id(self) -> int:
        """Input id of a masked position (the last id of the vocabulary)."""
        return self.vocab_size - 1

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    def with_codebook(self, codebook_size: int) -> "ModelConfig":
        """This config resized to a tokenizer's codebook, keeping the number of spare ids.

        ``train`` sizes the ``debug`` model from the code-shard manifest this way:
        ``MODELS["debug"].with_codebook(K)`` (vocab = K + 1 for debug, mask id = K).
        """
        spare = self.vocab_size - self.codebook_size
        return dataclasses.replace(self, codebook_size=codebook_size, vocab_size=codebook_size + spare)

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """Grid the transformer blocks see for an (h, w) code grid: halved when compressing 2x2."""
        if not self.downsample:
            return h, w
        if h % 2 or w % 2:
            raise ValueError(f"a model with 2x2 compression needs an even code grid, got {h}x{w}")
        return h // 2, w // 2


MODELS: dict[str, ModelConfig] = {
    # Tiny model for tests and the demo: CPU forward+backward in milliseconds. Its codebook is
    # resized to the data's with `.with_codebook(K)`; text_dim/pooled_dim 64 match TextEncoder.tiny().
    # 96 wide (3 heads): on the shapes world (bench/toy_t2i.py, 4,000 steps, same seed) it rendered
    # 48% of held-out prompts right vs 19% at 64 wide, 33% at 64 wide x 4 blocks, 31% at 128 wide,
    # for 1.6x the step time of 64 wide (128 wide: 2.3x).
    "debug": ModelConfig(codebook_size=64, vocab_size=65, hidden=96, heads=3, head_dim=32,
                         dual_blocks=1, single_blocks=1, text_dim=64, pooled_dim=64,
                         micro_cond_embed_dim=16, timestep_embed_dim=32, rope_axes=(8, 12, 12)),
    # The released Meissonic transformer at 256/512 px (stage1, stage2): no compression layers.
    "meissonic-1b": ModelConfig(),
    # The same at 1024 px (stage3): the 2x2 down/up layers of the released checkpoint.
    "meissonic-1b-1024": ModelConfig(downsample=True),
}


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) floats -> (N, dim) [cos | sin] features with frequencies max_period^(-k/(dim/2)).

    Same as diffusers' get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0),
    which the released checkpoint was trained with.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half
    angles = values.float()[:, None] * torch.exp(exponent)[None, :]  # (N, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim with a learned scale.

    The statistics are accumulated in float32 by the kernel itself; the input is not upcast
    first, so a bf16 activation is saved for backward as bf16 (an fp32 copy of q and k would
    cost ~16 KB per token per block).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class Conv1x1(nn.Module):
    """A 1x1 convolution (weight (out, in, 1, 1) as in the checkpoint) applied to channels-last input."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim_out, dim_in, 1, 1))
        nn.init.xavier_uniform_(self.weight.view(dim_out, dim_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim_in) -> (..., dim_out)
        return F.linear(x, self.weight.flatten(1))


class TwoLayerMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out, bias=bias)
        self.linear_2 = nn.Linear(dim_out, dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """temb (B, D) = MLP(sinusoid(condition)) + MLP(conditioning vector)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.timestep_dim = cfg.timestep_embed_dim
        self.timestep_embedder = TwoLayerMLP(cfg.timestep_embed_dim, cfg.hidden)
        self.text_embedder = TwoLayerMLP(cfg.hidden, cfg.hidden)

    def forward(self, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = sinusoidal_embedding(timestep, self.timestep_dim).to(cond.dtype)  # (B, timestep_dim)
        return self.timestep_embedder(t) + self.text_embedder(cond)


class AdaLNZero(nn.Module):
    """SiLU -> linear to ``n`` (B, D) modulation vectors; zero-initialised, so blocks start as identity."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.n, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm (no affine) of x (B, L, D), then x * (1 + scale) + shift with (B, D) vectors."""
    x = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return x * (1 + scale[:, None]) + shift[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              cos: torch.Tensor, sin: torch.Tensor, norm_q: RMSNorm, norm_k: RMSNorm) -> torch.Tensor:
    """Multi-head attention with QK-RMSNorm and RoPE: (B, S, D) x3 -> (B, S, D)."""
    b, s, d = q.shape
    q, k, v = (t.view(b, s, heads, d // heads).transpose(1, 2) for t in (q, k, v))  # (B, H, S, Dh)
    q = apply_rope(norm_q(q), cos, sin)
    k = apply_rope(norm_k(k), cos, sin)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, s, d)


class JointAttention(nn.Module):
    """Dual-stream attention: separate q/k/v/out weights per stream, one softmax over [text, image]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.heads = cfg.hidden, cfg.heads
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm_q, self.norm_k = RMSNorm(cfg.head_dim, cfg.eps), RMSNorm(cfg.head_dim, cfg.eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(cfg.head_dim, cfg.eps), RMSNorm(cfg.head_dim, cfg.eps)
        self.to_out = nn.ModuleList([nn.Linear(d, d)])  # a list only for the checkpoint's `to_out.0` name
        self.to_add_out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        t = ctx.shape[1]
        b, s, d = x.shape
        # Per-stream projections and QK norms, then one sequence [text; image] of T + L tokens.
        q = torch.cat([self._heads_norm(self.add_q_proj(ctx), self.norm_added_q),
                       self._heads_norm(self.to_q(x), self.norm_q)], dim=2)
        k = torch.cat([self._heads_norm(self.add_k_proj(ctx), self.norm_added_k),
                       self._heads_norm(self.to_k(x), self.norm_k)], dim=2)
        v = torch.cat([self._heads(self.add_v_proj(ctx)), self._heads(self.to_v(x))], dim=2)
        out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        out = out.transpose(1, 2).reshape(b, t + s, d)  # (B, T+L, D)
        return self.to_out[0](out[:, t:]), self.to_add_out(out[:, :t])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, H, S, Dh)
        b, s, d = x.shape
        return x.view(b, s, self.heads, d // self.heads).transpose(1, 2)

    def _heads_norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        return norm(self._heads(x))


class SelfAttention(nn.Module):
    """Single-stream attention; no output projection (the block's proj_out plays that role)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.heads = cfg.hidden, cfg.heads
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm_q, self.norm_k = RMSNorm(cfg.head_dim, cfg.eps), RMSNorm(cfg.head_dim, cfg.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads, cos, sin,
                         self.norm_q, self.norm_k)


class GeluProj(nn.Module):
    """Linear then tanh-approximated GELU (diffusers' GELU module, named ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """D -> mlp_hidden -> D. ``net.1`` is upstream's dropout slot, kept empty so names match."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GeluProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DualBlock(nn.Module):
    """MM-DiT block: image and text streams, each with AdaLN-Zero, joint attention, own MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.norm1 = AdaLNZero(cfg.hidden, 6)
        self.norm1_context = AdaLNZero(cfg.hidden, 6)
        self.attn = JointAttention(cfg)
        self.ff = FeedForward(cfg.hidden, cfg.mlp_hidden)
        self.ff_context = FeedForward(cfg.hidden, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.norm1(temb)  # each (B, D)
        c_shift_a, c_scale_a, c_gate_a, c_shift_m, c_scale_m, c_gate_m = self.norm1_context(temb)
        attn_x, attn_c = self.attn(modulate(x, shift_a, scale_a, self.eps),
                                   modulate(ctx, c_shift_a, c_scale_a, self.eps), cos, sin)
        x = x + gate_a[:, None] * attn_x
        x = x + gate_m[:, None] * self.ff(modulate(x, shift_m, scale_m, self.eps))
        ctx = ctx + c_gate_a[:, None] * attn_c
        ctx = ctx + c_gate_m[:, None] * self.ff_context(modulate(ctx, c_shift_m, c_scale_m, self.eps))
        return x, ctx


class SingleBlock(nn.Module):
    """Single-stream block: attention and MLP in parallel from one AdaLN-Zero, one output projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.norm = AdaLNZero(cfg.hidden, 3)
        self.proj_mlp = nn.Linear(cfg.hidden, cfg.mlp_hidden)
        self.proj_out = nn.Linear(cfg.hidden + cfg.mlp_hidden, cfg.hidden)
        self.attn = SelfAttention(cfg)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> torch.Tensor:
        shift, scale, gate = self.norm(temb)
        h = modulate(x, shift, scale, self.eps)  # (B, S, D)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        return x + gate[:, None] * self.proj_out(torch.cat([self.attn(h, cos, sin), mlp], dim=-1))


class TokenEmbed(nn.Module):
    """Code ids (B, h, w) -> RMSNorm(embedding) -> 1x1 conv -> (B, h, w, D) channels-last."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layer_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.conv = Conv1x1(cfg.hidden, cfg.hidden)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.conv(self.layer_norm(self.embeddings(codes)))


class MlmHead(nn.Module):
    """(B, h, w, D) -> 1x1 conv -> RMSNorm -> 1x1 conv -> (B, h, w, codebook_size) logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.conv1 = Conv1x1(cfg.hidden, cfg.hidden)
        self.layer_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.conv2 = Conv1x1(cfg.hidden, cfg.codebook_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.layer_norm(self.conv1(x)))


class Downsample2x2(nn.Module):
    """RMSNorm then a 2x2 stride-2 conv: (B, h, w, D) -> (B, h/2, w/2, D).

    Starts as 2x2 average pooling so that adding it to a trained stage-2 model (stage3) keeps
    the function close to what was learnt instead of scrambling it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.conv = nn.Conv2d(cfg.hidden, cfg.hidden, kernel_size=2, stride=2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(cfg.hidden)[:, :, None, None].expand(-1, -1, 2, 2) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.conv(x).permute(0, 2, 3, 1)


class Upsample2x2(nn.Module):
    """RMSNorm then a 2x2 stride-2 transposed conv: (B, h, w, D) -> (B, 2h, 2w, D); starts as nearest copy."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.conv = nn.ConvTranspose2d(cfg.hidden, cfg.hidden, kernel_size=2, stride=2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(cfg.hidden)[:, :, None, None].expand(-1, -1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).permute(0, 3, 1, 2)
        return self.conv(x).permute(0, 2, 3, 1)


class DownBlock(nn.Module):
    """Holder giving the checkpoint's ``down_block.downsample.*`` names."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.downsample = Downsample2x2(cfg)


class UpBlock(nn.Module):
    """Holder giving the checkpoint's ``up_block.upsample.*`` names."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.upsample = Upsample2x2(cfg)


class MeissonicTransformer(nn.Module):
    """The masked-token transformer. See the module docstring for the data flow."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False  # recompute each block in backward when True
        d = cfg.hidden
        self.embed = TokenEmbed(cfg)
        self.cond_embed = TwoLayerMLP(cfg.pooled_dim + cfg.micro_cond_dim * cfg.micro_cond_embed_dim, d,
                                      bias=False)
        self.time_text_embed = TimeTextEmbed(cfg)
        self.context_embedder = nn.Linear(cfg.text_dim, d)
        self.encoder_proj_layer_norm = RMSNorm(d, cfg.eps)
        self.project_to_hidden_norm = RMSNorm(d, cfg.eps)
        self.project_to_hidden = nn.Linear(d, d, bias=False)
        self.transformer_blocks = nn.ModuleList(DualBlock(cfg) for _ in range(cfg.dual_blocks))
        self.single_transformer_blocks = nn.ModuleList(SingleBlock(cfg) for _ in range(cfg.single_blocks))
        self.project_from_hidden_norm = RMSNorm(d, cfg.eps)
        self.project_from_hidden = nn.Linear(d, d, bias=False)
        self.mlm_layer = MlmHead(cfg)
        if cfg.downsample:
            self.down_block = DownBlock(cfg)
            self.up_block = UpBlock(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears, N(0, 0.02) embeddings and timestep MLP, zero AdaLN (blocks = identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.embed.embeddings.weight, std=0.02)
        for linear in (self.time_text_embed.timestep_embedder.linear_1,
                       self.time_text_embed.timestep_embedder.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, AdaLNZero):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)

    def conditioning(self, pooled: torch.Tensor, micro_conds: torch.Tensor, timestep: torch.Tensor
                     ) -> torch.Tensor:
        """temb (B, D) from pooled text (B, P), micro-conditions (B, 5) and the condition value (B,).

        The condition value is multiplied by 1000 here, in the dtype it arrives in, as the released
        transformer does (``timestep.to(hidden_states.dtype) * 1000``): what the value means is the
        caller's convention (``train/convention.py``: this project feeds the mask ratio, so the
        sinusoid sees 1000·r; the released weights were trained on 1000·r here, i.e. r·10^6).
        """
        b = pooled.shape[0]
        micro = sinusoidal_embedding(micro_conds.reshape(-1), self.cfg.micro_cond_embed_dim)  # (B*5, E)
        micro = micro.reshape(b, self.cfg.micro_cond_dim * self.cfg.micro_cond_embed_dim)
        cond = self.cond_embed(torch.cat([pooled.float(), micro], dim=1).to(pooled.dtype))  # (B, D)
        return self.time_text_embed((timestep * 1000.0).float(), cond)

    def forward(self, codes: torch.Tensor, text_hidden: torch.Tensor, pooled: torch.Tensor,
                micro_conds: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) ids with masked positions = mask_token_id; text_hidden (B, T, text_dim);
        pooled (B, pooled_dim); micro_conds (B, 5) float; timestep (B,) float.
        Returns logits (B, h*w, codebook_size), positions row-major."""
        self._check_inputs(codes, text_hidden, pooled, micro_conds, timestep)
        b, h, w = codes.shape
        temb = self.conditioning(pooled, micro_conds, timestep)
        ctx = self.encoder_proj_layer_norm(self.context_embedder(text_hidden))  # (B, T, D)
        x = self.embed(codes)  # (B, h, w, D)
        if self.cfg.downsample:
            x = self.down_block.downsample(x)  # (B, h/2, w/2, D)
        gh, gw = x.shape[1], x.shape[2]
        x = self.project_to_hidden(self.project_to_hidden_norm(x.reshape(b, gh * gw, -1)))  # (B, L, D)
        x = self._blocks(x, ctx, temb, gh, gw)
        x = self.project_from_hidden(self.project_from_hidden_norm(x)).reshape(b, gh, gw, -1)
        if self.cfg.downsample:
            x = self.up_block.upsample(x)  # (B, h, w, D)
        return self.mlm_layer(x).reshape(b, h * w, self.cfg.codebook_size)

    def _blocks(self, x: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor, gh: int, gw: int
                ) -> torch.Tensor:
        """Dual blocks on (image, text), then single blocks on [text; image]; returns the image part."""
        t = ctx.shape[1]
        img_ids, txt_ids = rope_ids(gh, gw, t, x.device)
        cos, sin = rope_cos_sin(torch.cat([txt_ids, img_ids]), self.cfg.rope_axes, self.cfg.rope_theta)
        for block in self.transformer_blocks:
            x, ctx = self._run(block, x, ctx, temb, cos, sin)
        joint = torch.cat([ctx, x], dim=1)  # (B, T+L, D)
        for block in self.single_transformer_blocks:
            joint = self._run(block, joint, temb, cos, sin)
        return joint[:, t:]

    def _run(self, block: nn.Module, *args: torch.Tensor):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_inputs(self, codes: torch.Tensor, text_hidden: torch.Tensor, pooled: torch.Tensor,
                      micro_conds: torch.Tensor, timestep: torch.Tensor) -> None:
        """Fail with the offending name and shape instead of a matmul error deep inside."""
        cfg, b = self.cfg, codes.shape[0]
        checks = {"codes (B, h, w)": (codes, codes.ndim == 3),
                  f"text_hidden (B, T, {cfg.text_dim})": (text_hidden, text_hidden.ndim == 3 and
                                                         text_hidden.shape[::2] == (b, cfg.text_dim)),
                  f"pooled (B, {cfg.pooled_dim})": (pooled, tuple(pooled.shape) == (b, cfg.pooled_dim)),
                  f"micro_conds (B, {cfg.micro_cond_dim})": (micro_conds, tuple(micro_conds.shape) ==
                                                             (b, cfg.micro_cond_dim)),
                  "timestep (B,)": (timestep, tuple(timestep.shape) == (b,))}
        for name, (tensor, ok) in checks.items():
            if not ok:
                raise ValueError(f"model input {name} with B={b}: got shape {tuple(tensor.shape)}")
        cfg.token_grid(codes.shape[1], codes.shape[2])  # raises on an odd grid when compressing


def build_model(cfg: ModelConfig) -> MeissonicTransformer:
    """A freshly initialised model (use ``torch.device('meta')`` as a context to build it without memory)."""
    return MeissonicTransformer(cfg)


def compile_blocks(model: MeissonicTransformer, backend: str = "inductor") -> MeissonicTransformer:
    """``torch.compile`` every block, the token embedding and the logits head in place
    ("regional" compilation, as torchtitan's ``apply_compile``), each with ``fullgraph=True`` so a
    graph break is an error. Returns the same model; state-dict names do not change (the modules'
    ``forward`` methods are compiled, the modules are not wrapped).

    Why these regions rather than the whole model or the DDP wrapper:
    - DDP/FSDP2 is applied afterwards and stays the outermost module, so ``no_sync`` /
      ``set_requires_gradient_sync`` act on it, and FSDP2's hooks run outside compiled code;
    - each block's backward is its own autograd node, so DDP all-reduces one block's gradients
      while the earlier blocks still run backward (a whole-model graph hands every gradient over at
      its end; ``torch.compile(DDP)`` splits graphs with DDPOptimizer, which refuses activation
      checkpointing's higher-order op, the error upstream Meissonic's transformer.py notes);
    - one compilation per block class serves all 42 blocks.
    What stays eager is small per-token work: two RMSNorms around the blocks, the RoPE tables and
    the per-sample conditioning.
    """
    regions = (*model.transformer_blocks, *model.single_transformer_blocks, model.embed, model.mlm_layer)
    for module in regions:
        module.forward = torch.compile(module.forward, backend=backend, fullgraph=True)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compression_keys(model: MeissonicTransformer) -> list[str]:
    """State-dict names of the 2x2 down/up layers (empty without compression)."""
    return [k for k in model.state_dict() if k.startswith(("down_block.", "up_block."))]


def load_without_compression(model: MeissonicTransformer, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load a model without compression layers (stage2) into one with them (stage3).

    Every tensor of ``state_dict`` must load; only the down/up layers may be missing, and those
    keep their initialisation (average pooling / nearest copy). Returns the names left initialised.
    """
    result = model.load_state_dict(state_dict, strict=False)
    allowed = set(compression_keys(model))
    bad_missing = [k for k in result.missing_keys if k not in allowed]
    if result.unexpected_keys or bad_missing:
        raise ValueError(f"state dict does not fit this model apart from the compression layers: "
                         f"missing {bad_missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return list(result.missing_keys)
