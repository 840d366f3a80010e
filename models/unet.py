"""An openaimodel-style diffusion UNet (the guided-diffusion / latent-diffusion ``UNetModel``).

Written from scratch for bqc, following the design of
``ldm.modules.diffusionmodules.openaimodel.UNetModel`` closely enough that:

* module names (and therefore ``state_dict`` keys) are the same as openaimodel's, e.g.
  ``input_blocks.1.0.in_layers.2.weight``, ``middle_block.1.qkv.weight``,
  ``output_blocks.3.1.proj_out.weight``, ``out.2.weight``;
* parameter counts match published models (LDM-4 LSUN-Bedrooms: 274,056,163);
* the forward code keeps the idioms people actually run (the ``while len(emb_out.shape) <
  len(h.shape)`` broadcast loop, the class-conditional ``assert``, ``GroupNorm32``'s float
  upcast, Python control flow over module lists). ``torch.fx.symbolic_trace`` cannot trace
  this code; ``torch.export.export`` can, and that is what bqc's front end uses.

Attention is written with explicit ``torch.bmm`` + ``softmax`` (not SDPA, not einsum) so the
exported graph shows the two attention matmuls as separate ops whose operands bqc can
quantize.

Text conditioning (LDM / Stable Diffusion v1): ``use_spatial_transformer=True`` with
``context_dim`` puts a :class:`SpatialTransformer` (GroupNorm, 1x1 ``proj_in``, ``depth``
:class:`BasicTransformerBlock` s of self-attention ``attn1``, cross-attention ``attn2`` whose K/V
read the text embedding ``context``, and a GEGLU :class:`FeedForward` ``ff``, each after its own
LayerNorm, then a zero-initialised 1x1 ``proj_out``) where openaimodel puts an
``AttentionBlock``, with LDM's module names (``input_blocks.1.1.transformer_blocks.0.attn2.to_k``,
``...ff.net.0.proj``), so LDM / SD-1.x checkpoints load into it. Attention is explicit
``bmm`` + ``softmax`` here too.

Only 2-D UNets are implemented (``dims=2``); ``use_fp16`` and ``use_linear_in_transformer``
(SD-2) are not supported; ``use_checkpoint`` (gradient checkpointing, a training-memory
option) is accepted and ignored: it does not change what the model computes.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "timestep_embedding",
    "GroupNorm32",
    "normalization",
    "zero_module",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "Upsample",
    "Downsample",
    "ResBlock",
    "QKVAttentionLegacy",
    "QKVAttention",
    "AttentionBlock",
    "GEGLU",
    "FeedForward",
    "CrossAttention",
    "BasicTransformerBlock",
    "SpatialTransformer",
    "UNetModel",
]


# --------------------------------------------------------------------------- helpers


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep embeddings, ``(N,) -> (N, dim)``: ``[cos(t f_i), sin(t f_i)]``.

    ``f_i = exp(-log(max_period) * i / half)`` for ``i < half = dim // 2``; an odd ``dim``
    gets one zero column appended (as in openaimodel).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
    ).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (openaimodel's fp16-safe normalisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The standard normalisation layer: GroupNorm with 32 groups."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of ``module`` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


# --------------------------------------------------------------------------- blocks


class TimestepBlock(nn.Module):
    """A module whose ``forward`` takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        ...


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that passes ``emb`` to the children that accept it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class _Resample(nn.Module):
    """What Upsample and Downsample share: channel bookkeeping and the no-conv check."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        _check_dims(dims)
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if not use_conv and self.out_channels != self.channels:
            raise ValueError(f"{type(self).__name__} without a conv cannot change the channel count")


class Upsample(_Resample):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__(channels, use_conv, dims, out_channels)
        if use_conv:
            self.conv = nn.Conv2d(self.channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(_Resample):
    """2x downsampling: a stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__(channels, use_conv, dims, out_channels)
        if use_conv:
            self.op = nn.Conv2d(self.channels, self.out_channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """A residual block conditioned on the timestep embedding.

    ``in_layers`` (GroupNorm, SiLU, conv3x3) -> add ``emb_layers(emb)`` (or scale/shift the
    output norm when ``use_scale_shift_norm``) -> ``out_layers`` (GroupNorm, SiLU, Dropout,
    zero-initialised conv3x3), plus ``skip_connection(x)`` (identity, or a 1x1 conv, or a 3x3
    conv with ``use_conv``, when the channel count changes). ``up``/``down`` resample inside the
    block (BigGAN style, ``resblock_updown``).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        _check_dims(dims)
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = h + emb_out
            h = self.out_layers(h)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Multi-head QKV attention, legacy layout: ``qkv`` is split into heads first, then q/k/v.

    Input ``(B, 3 * H * C, T)``, output ``(B, H * C, T)``. q and k are each scaled by
    ``1 / sqrt(sqrt(C))`` (more stable in fp16 than scaling the product). The two matmuls are
    plain ``torch.bmm`` calls so they appear as separate ops in an exported graph.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        # weight[b, t, s] = sum_c q[b, c, t] k[b, c, s]
        weight = torch.bmm((q * scale).transpose(1, 2), k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        # a[b, c, t] = sum_s weight[b, t, s] v[b, c, s]
        a = torch.bmm(v, weight.transpose(1, 2))
        return a.reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """Multi-head QKV attention, new layout: ``qkv`` is split into q/k/v first, then heads."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        q = (q * scale).reshape(bs * self.n_heads, ch, length)
        k = (k * scale).reshape(bs * self.n_heads, ch, length)
        weight = torch.bmm(q.transpose(1, 2), k)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.bmm(v.reshape(bs * self.n_heads, ch, length), weight.transpose(1, 2))
        return a.reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention: GroupNorm -> qkv (1x1 conv1d, 3C) -> attention -> proj_out.

    ``num_head_channels`` (if not -1) fixes the width of a head and overrides ``num_heads``.
    ``proj_out`` is zero-initialised, so a fresh block is the identity.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            if num_heads < 1 or channels % num_heads:
                raise ValueError(f"AttentionBlock: {channels} channels cannot be split into {num_heads} heads")
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(
                    f"AttentionBlock: {channels} channels are not divisible by num_head_channels={num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        if use_new_attention_order:
            self.attention = QKVAttention(self.num_heads)
        else:
            self.attention = QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = self.attention(qkv)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


# --------------------------------------------------------------------------- text conditioning
# LDM's ldm/modules/attention.py module names (state-dict compatible), bqc's own code.


class GEGLU(nn.Module):
    """Gated GELU projection: ``proj`` to ``2 * dim_out``, then ``a * gelu(gate)``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """``net``: GEGLU (or Linear + GELU without ``glu``), Dropout, Linear back to ``dim``."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(nn.Linear(dim, inner), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention over tokens ``(B, N, dim)``: queries from ``x``, keys and values from
    ``context`` (``(B, M, context_dim)``; ``x`` itself when None: self-attention). Bias-free
    ``to_q``/``to_k``/``to_v``, ``to_out`` = Linear + Dropout. The two attention products are
    explicit ``bmm`` calls."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = dim_head * heads
        context_dim = context_dim or query_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (b, n, h*d) -> (b*h, n, d)
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3).reshape(b * self.heads, n, -1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(context)), self._heads(self.to_v(context))
        sim = torch.bmm(q, k.transpose(1, 2)) * self.scale
        attn = sim.softmax(dim=-1)
        out = torch.bmm(attn, v)
        bh, n, d = out.shape
        out = out.reshape(bh // self.heads, self.heads, n, d).permute(0, 2, 1, 3).reshape(bh // self.heads, n, -1)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention ``attn1``, cross-attention ``attn2`` (reads
    ``context``), GEGLU feed-forward ``ff``; each adds to the residual stream after its own
    LayerNorm (``norm1``..``norm3``)."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 gated_ff: bool = True):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: GroupNorm(32, eps 1e-6) -> 1x1 ``proj_in`` ->
    tokens ``(B, H*W, C)`` -> ``transformer_blocks`` -> back to ``(B, C, H, W)`` -> 1x1 ``proj_out``
    (zero-initialised) + the input."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None):
        super().__init__()
        inner = n_heads * d_head
        self.in_channels = in_channels
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, dropout=dropout, context_dim=context_dim) for _ in range(depth)])
        self.proj_out = zero_module(nn.Conv2d(inner, in_channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        inner = x.shape[1]
        x = x.reshape(b, inner, h * w).transpose(1, 2)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = x.transpose(1, 2).reshape(b, inner, h, w)
        return self.proj_out(x) + x_in


# --------------------------------------------------------------------------- the UNet


def _check_dims(dims: int) -> None:
    if dims != 2:
        raise NotImplementedError(f"only 2-D UNets are implemented (dims=2), got dims={dims}")


class UNetModel(nn.Module):
    """The openaimodel diffusion UNet with attention and timestep embedding.

    Args:
        image_size: nominal input resolution (stored, as in openaimodel; any size divisible by
            ``2 ** (len(channel_mult) - 1)`` works).
        in_channels, out_channels: channels of the input ``x`` and of the output (eps).
        model_channels: base channel count (a multiple of 32, for GroupNorm(32)).
        num_res_blocks: residual blocks per resolution level (the decoder has one more).
        attention_resolutions: downsample factors (1, 2, 4, ...) at which attention is used.
        dropout: dropout probability in the residual blocks.
        channel_mult: channel multiplier per level.
        conv_resample: learned 3x3 convs for up/downsampling (else nearest / avg-pool).
        dims: must be 2.
        num_classes: if set, the model is class-conditional with ``num_classes`` classes.
        num_heads: attention heads (used when ``num_head_channels`` is -1).
        num_head_channels: fixed channels per head (overrides ``num_heads``).
        num_heads_upsample: heads in the decoder (-1: same as ``num_heads``).
        use_scale_shift_norm: FiLM-like conditioning of the residual blocks.
        resblock_updown: resample with residual blocks instead of Up/Downsample.
        use_new_attention_order: split qkv into q/k/v before heads (else the legacy order).
        use_spatial_transformer: a :class:`SpatialTransformer` instead of each ``AttentionBlock``
            (text conditioning, LDM / SD-1.x); needs ``context_dim``.
        transformer_depth: transformer blocks per SpatialTransformer.
        context_dim: width of the conditioning tokens ``context`` (N, L, context_dim).
        legacy: LDM's head-width rule flag; with a spatial transformer both settings give
            ``ch // heads`` channels per head, so it is accepted for config compatibility.
        use_checkpoint: accepted and ignored (gradient checkpointing changes memory, not outputs).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        legacy: bool = True,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        _check_dims(dims)
        if use_spatial_transformer != (context_dim is not None):  # a missing argument: TypeError, as Python's
            raise TypeError("use_spatial_transformer and context_dim go together: a spatial transformer needs the "
                             "width of the conditioning tokens (context_dim), and context_dim needs use_spatial_transformer")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")
        if model_channels % 32:
            raise ValueError(f"model_channels must be a multiple of 32 (GroupNorm with 32 groups), got {model_channels}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if not channel_mult or any(int(m) < 1 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive integers, got {channel_mult}")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(int(a) for a in attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(int(m) for m in channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.use_spatial_transformer = use_spatial_transformer
        self.context_dim = int(context_dim) if context_dim is not None else None

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )

        if self.num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(
                ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                use_scale_shift_norm=use_scale_shift_norm, **kw,
            )

        def attn(ch: int, heads: int) -> nn.Module:
            if use_spatial_transformer:  # LDM: the head count (or width) of the encoder everywhere
                n = num_heads if num_head_channels == -1 else ch // num_head_channels
                if n < 1 or ch % n:
                    raise ValueError(f"SpatialTransformer: {ch} channels cannot be split into {n} heads")
                return SpatialTransformer(ch, n, ch // n, depth=transformer_depth, dropout=dropout,
                                          context_dim=self.context_dim)
            return AttentionBlock(
                ch, num_heads=heads, num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                out_ch = ch
                self.input_blocks.append(
                    TimestepEmbedSequential(
                        res(ch, out_ch, down=True)
                        if resblock_updown
                        else Downsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                    )
                )
                ch = out_ch
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    out_ch = ch
                    layers.append(
                        res(ch, out_ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise: ``x`` (N, C, H, W), ``timesteps`` (N,), ``y`` (N,) labels if
        class-conditional, ``context`` (N, L, context_dim) text embedding if text-conditioned
        (keyword, as LDM calls it; ``y`` stays third for bqc's positional callers)."""
        assert (context is not None) == (self.context_dim is not None), \
            "must specify context if and only if the model is text-conditioned (context_dim)"
        assert (y is not None) == (self.num_classes is not None), "must specify y if and only if the model is class-conditional"
        hs = []
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb)

        if self.num_classes is not None:
            assert y.shape == (x.shape[0],)
            emb = emb + self.label_emb(y)

        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        return self.out(h)
