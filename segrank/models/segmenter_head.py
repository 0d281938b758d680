"""Segmenter decoders: the mask transformer (baseline) and the linear decoder of the official code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segrank.config import HeadConfig
from segrank.models.blocks import Block, init_transformer_weights, stochastic_depth_rates
from segrank.models.output import DecodeHead, SegOutput


def tokens_of(feature_map: Tensor) -> Tensor:
    """(B, D, h, w) -> (B, h*w, D), row-major."""
    return feature_map.flatten(2).transpose(1, 2)


class MaskDecoderBase(DecodeHead):
    """Parameters and the cosine-mask step shared by the Segmenter and RankSeg mask transformers."""

    def __init__(self, cfg: HeadConfig, num_classes: int, d_encoder: int, n_blocks: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.num_classes = num_classes
        self.cls_emb_from_backbone = cfg.cls_emb_from_backbone
        if not cfg.cls_emb_from_backbone:
            self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, d))
        self.proj_dec = nn.Linear(d_encoder, d)
        rates = stochastic_depth_rates(cfg.drop_path_rate, n_blocks)
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_heads, cfg.d_ff, cfg.dropout, r, cfg.norm_eps) for r in rates
        )
        self.decoder_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.proj_patch = nn.Parameter(torch.empty(d, d))
        self.proj_classes = nn.Parameter(torch.empty(d, d))

    def reset_parameters(self) -> None:
        self.apply(init_transformer_weights)
        d = self.proj_patch.shape[0]
        with torch.no_grad():
            self.proj_patch.copy_(d**-0.5 * torch.randn(d, d))
            self.proj_classes.copy_(d**-0.5 * torch.randn(d, d))
        if not self.cls_emb_from_backbone:
            nn.init.trunc_normal_(self.cls_emb, std=0.02)

    @property
    def seg_blocks(self) -> nn.ModuleList:
        """The mask-transformer blocks, run on [patch tokens; class tokens] (``Block.attn`` of each can be recorded)."""
        return self.blocks

    @property
    def multilabel_block(self) -> Block | None:
        """The block whose class tokens score the image's classes (RankSeg's multi-label layer), if any."""
        return None

    def class_embeddings(self, batch: int, backbone_classes: Tensor | None) -> Tensor:
        if self.cls_emb_from_backbone:
            if backbone_classes is None:
                raise ValueError("this head takes class tokens from the backbone (OCE) but got none")
            return backbone_classes  # bypasses proj_dec, as in the reference
        return self.cls_emb.expand(batch, -1, -1)

    def cosine_masks(
        self, patches: Tensor, classes: Tensor, blocks: nn.ModuleList, key_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Run ``blocks`` on [patches; classes]; return L2-normalised projected patches and classes."""
        n_patch = patches.shape[1]
        x = torch.cat([patches, classes], dim=1)
        for block in blocks:
            x = block(x, key_mask)
        x = self.decoder_norm(x)
        p = F.normalize(x[:, :n_patch] @ self.proj_patch, dim=-1)
        c = F.normalize(x[:, n_patch:] @ self.proj_classes, dim=-1)
        return p, c


def to_grid(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, h*w, C) -> contiguous (B, C, h, w): resizing a channels-last view later would copy at full size."""
    return masks.transpose(1, 2).reshape(masks.shape[0], masks.shape[2], grid[0], grid[1]).contiguous()


class MaskTransformerHead(MaskDecoderBase):
    """Segmenter mask transformer: cosine similarity of patch and class tokens, LayerNorm over classes."""

    def __init__(self, cfg: HeadConfig, num_classes: int, d_encoder: int) -> None:
        super().__init__(cfg, num_classes, d_encoder, cfg.n_layers)
        self.mask_norm = nn.LayerNorm(num_classes, eps=cfg.norm_eps)
        self.reset_parameters()

    def forward(self, feature_map: Tensor, backbone_classes: Tensor | None = None) -> SegOutput:
        grid = feature_map.shape[2:]
        patches = self.proj_dec(tokens_of(feature_map))
        classes = self.class_embeddings(patches.shape[0], backbone_classes)
        p, c = self.cosine_masks(patches, classes, self.blocks)
        masks = self.mask_norm(p @ c.transpose(1, 2))
        return SegOutput(to_grid(masks, grid), self.num_classes)


class LinearHead(DecodeHead):
    """Official Segmenter linear decoder: one Linear from patch features to class logits (``cfg`` sets nothing)."""

    def __init__(self, cfg: HeadConfig, num_classes: int, d_encoder: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.head = nn.Linear(d_encoder, num_classes)
        init_transformer_weights(self.head)

    def forward(self, feature_map: Tensor, backbone_classes: Tensor | None = None) -> SegOutput:
        logits = self.head(tokens_of(feature_map))
        return SegOutput(to_grid(logits, feature_map.shape[2:]), self.num_classes)
