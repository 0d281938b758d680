"""Transformer building blocks shared by the ViT backbone and the mask-transformer decoders.

Parameter names follow timm (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``), which
are also the names the Segmenter and RankSeg decode heads use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample during training."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


@dataclass
class AttentionRecorder:
    """What a recorded ``Attention`` layer computes besides its output: ``rows(L)`` picks the query tokens (an index
    tensor or a slice of the L tokens) whose weights ``store`` receives, as (B, heads, R, L)."""

    rows: Callable[[int], Tensor | slice]
    store: Callable[[Tensor], None]


class Attention(nn.Module):
    """Multi-head self-attention through the fused ``F.scaled_dot_product_attention``.

    The fused kernel never materialises its weights. While a ``recorder`` is set (``recording``), the layer also
    computes the weights of the rows it asks for with ``attention_weights`` (the kernel's softmax(q k^T / sqrt(d) +
    mask), from the same q and k) and hands them over; its output still comes from the fused kernel, so recording
    changes no number the model returns (tests/models/test_attention_weights.py proves weights @ v equals it).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.recorder: AttentionRecorder | None = None

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x (B, L, D); key_mask (B, L) bool, False for tokens no query may attend to (padding)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        if self.recorder is not None:
            self.recorder.store(attention_weights(q[:, :, self.recorder.rows(L)], k, attn_mask))
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, L, D)))


def attention_weights(q: Tensor, k: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) over the keys, (B, heads, Lq, Lk), leaving out keys where the bool ``attn_mask`` is
    False: the weights ``F.scaled_dot_product_attention`` applies to v. Computed in float32 (also under autocast) from
    q and k as they are, as the fused kernels accumulate."""
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.softmax(-1)


@contextmanager
def recording(attention: Attention, recorder: AttentionRecorder) -> Iterator[None]:
    """Within the block, every forward of ``attention`` hands ``recorder`` the weights of the rows it asks for."""
    if attention.recorder is not None:
        raise RuntimeError("this attention layer is already being recorded")
    attention.recorder = recorder
    try:
        yield
    finally:
        attention.recorder = None


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), key_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def stochastic_depth_rates(rate: float, depth: int) -> list[float]:
    return torch.linspace(0, rate, depth, device="cpu").tolist()


def init_transformer_weights(module: nn.Module) -> None:
    """timm/Segmenter init: Linear trunc_normal(0.02) with zero bias, LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
