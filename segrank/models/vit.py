"""Vision Transformer backbone (ViT-T/S/B/L 16) with timm parameter names.

Inputs are zero-padded bottom/right to a multiple of the patch size; the learned position table is resampled to
the patch grid whenever the grid shape differs from the stored one (the references only resample when the
*token count* differs, which silently scrambles positions for e.g. a 4x16 grid against an 8x8 table).
Optional OCE class tokens (RankSeg "class embeddings from the backbone") join the sequence before one block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segrank.config import BackboneConfig
from segrank.models.blocks import Block, init_transformer_weights, stochastic_depth_rates


@dataclass
class BackboneOutput:
    feature_map: Tensor  # (B, D, h, w) patch features of the last block
    class_tokens: Tensor | None = None  # (B, n_cls, D) OCE class tokens, when enabled


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D, ceil(H/p), ceil(W/p)), zero-padding bottom/right.

        Always padded, by 0 when the size is a multiple: a tracer (ONNX export with dynamic H/W) would otherwise
        freeze whichever branch its example size took. The pad is written through the ceil-divided grid so that
        torch.export can bound the grid from the input's range (it cannot see through ``-H % p``).
        """
        p = self.patch_size
        H, W = x.shape[2], x.shape[3]
        return self.proj(F.pad(x, (0, (W + p - 1) // p * p - W, 0, (H + p - 1) // p * p - H)))


def resample_pos_embed(
    pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str, num_prefix: int = 1
) -> Tensor:
    """Resize the grid part of a (1, prefix + gh*gw, D) table, keeping the prefix (cls) entries.

    Under torch.export the resize is always kept: comparing a symbolic grid with the table's would fix the
    exported graph to the example's size. At an equal size the bilinear and bicubic resizes are exact identities
    (all tap weights are exactly 0 or 1), so both paths give the same numbers.
    """
    if not torch.compiler.is_exporting() and tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode=mode, align_corners=False).to(pos_embed.dtype)
    return torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: BackboneConfig, num_classes: int = 0, in_chans: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        self.pos_embed_grid = tuple(cfg.pos_embed_grid)
        self.patch_embed = PatchEmbed(cfg.patch_size, in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        n_pos = 1 + self.pos_embed_grid[0] * self.pos_embed_grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, cfg.embed_dim))
        rates = stochastic_depth_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, int(cfg.embed_dim * cfg.mlp_ratio), 0.0, r, cfg.norm_eps)
            for r in rates
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.oce_start_layer = cfg.oce_start_layer
        if cfg.oce_start_layer is not None:
            if num_classes < 1:
                raise ValueError("OCE class tokens need num_classes")
            self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, cfg.embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.oce_start_layer is not None:
            nn.init.trunc_normal_(self.cls_emb, std=0.02)
        self.apply(init_transformer_weights)
        fan_in = self.patch_embed.proj.in_channels * self.patch_size**2
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def _tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.patch_embed(images)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = resample_pos_embed(self.pos_embed, self.pos_embed_grid, grid, self.cfg.pos_embed_interpolation)
        return x + pos, grid

    def forward_intermediates(self, images: Tensor, indices: list[int]) -> list[BackboneOutput]:
        """Patch maps after each block in ``indices``; the final norm applies after the last block only."""
        x, (h, w) = self._tokens(images)
        B, n_patch = x.shape[0], h * w
        outputs = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if i == self.oce_start_layer:
                x = torch.cat([x, self.cls_emb.expand(B, -1, -1)], dim=1)
            x = block(x)
            if i == last:
                x = self.norm(x)
            if i in indices:
                patches = x[:, 1 : 1 + n_patch].transpose(1, 2).reshape(B, -1, h, w)
                has_cls = self.oce_start_layer is not None and i >= self.oce_start_layer
                outputs.append(BackboneOutput(patches, x[:, 1 + n_patch :] if has_cls else None))
        return outputs

    def forward(self, images: Tensor) -> BackboneOutput:
        return self.forward_intermediates(images, [len(self.blocks) - 1])[0]
