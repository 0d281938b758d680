"""RankSeg decode heads (He et al., ECCV 2022).

An image-level multi-label branch scores all N classes, the top-k are kept, and the mask transformer classifies
pixels among those k only; a LayerNorm over the k scores has one affine (scale, bias) per *rank slot*.

Three multi-label branches (``HeadConfig.multilabel_head``):
- ``encoder_layer`` (main method, "1 TranEnc layer"): decoder block 0 on [pooled patch tokens; all class tokens];
  the selected class tokens are block 0's normalised outputs, so they carry image context.
- ``query2label`` ("2 TranDec layers" ablation) and ``global_pool`` ("Global Pooling" ablation): a separate
  classifier on the pooled map; the selected class tokens are the raw class embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segrank.config import HeadConfig
from segrank.models.blocks import Block, init_transformer_weights
from segrank.models.output import FILL_LOGIT, SegOutput
from segrank.models.pooling import adaptive_avg_pool2d
from segrank.models.segmenter_head import MaskDecoderBase, to_grid, tokens_of


class GroupWiseLinear(nn.Module):
    """One weight vector and bias per class: logits[b, c] = <W[c], x[b, c]> + b[c]."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(1, num_classes, dim))
        self.b = nn.Parameter(torch.empty(1, num_classes))
        bound = 1.0 / math.sqrt(dim)
        nn.init.uniform_(self.W, -bound, bound)
        nn.init.uniform_(self.b, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return (self.W * x).sum(-1) + self.b


def sine_position_table(dim: int, height: int, width: int, temperature: float = 10000.0) -> Tensor:
    """Normalised 2-D sine/cosine table (1, dim, H, W) as in DETR/Query2Label: [y features; x features]."""
    half = dim // 2
    scale, eps = 2 * math.pi, 1e-6
    y = torch.arange(1, height + 1, dtype=torch.float32)[:, None].expand(height, width)
    x = torch.arange(1, width + 1, dtype=torch.float32)[None, :].expand(height, width)
    y = y / (height + eps) * scale
    x = x / (width + eps) * scale
    dim_t = temperature ** (2 * (torch.arange(half, dtype=torch.float32) // 2) / half)

    def encode(pos: Tensor) -> Tensor:
        p = pos[:, :, None] / dim_t
        return torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2)

    return torch.cat((encode(y), encode(x)), dim=2).permute(2, 0, 1)[None]


class SinePositionTable(nn.Module):
    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.register_buffer("pe", sine_position_table(dim, size, size))


class CrossAttentionLayer(nn.Module):
    """Post-norm Query2Label decoder layer with its self-attention removed."""

    def __init__(self, dim: int, nhead: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, d_ff)
        self.linear2 = nn.Linear(d_ff, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        attended = self.multihead_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(attended))
        ff = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ff))


class CrossAttentionDecoder(nn.Module):
    def __init__(self, dim: int, nhead: int, d_ff: int, dropout: float, num_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, nhead, d_ff, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        tgt = torch.zeros_like(query_pos)
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
        return self.norm(tgt)


class Query2LabelClassifier(nn.Module):
    """"2 TranDec layers": cross-attention from the (shared) class embeddings to the pooled feature map."""

    def __init__(self, d_encoder: int, dim: int, num_classes: int, size: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.size = size
        self.input_proj = nn.Conv2d(d_encoder, dim, kernel_size=1)
        self.position_embedding = SinePositionTable(dim, size)
        self.transformer = nn.ModuleDict(
            {"decoder": CrossAttentionDecoder(dim, cfg.q2l_heads, cfg.q2l_d_ff, cfg.q2l_dropout)}
        )
        self.fc = GroupWiseLinear(num_classes, dim)
        for p in self.transformer.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, pooled: Tensor, class_embeddings: Tensor) -> Tensor:
        """pooled (B, d_enc, s, s), class_embeddings (N, d) -> (B, N) logits."""
        B = pooled.shape[0]
        memory = tokens_of(self.input_proj(pooled))
        pos = tokens_of(self.position_embedding.pe)
        query_pos = class_embeddings[None].expand(B, -1, -1)
        return self.fc(self.transformer["decoder"](memory, pos, query_pos))


def global_pool_classifier(d_encoder: int, num_classes: int) -> nn.Sequential:
    """"Global Pooling": average pool -> 1x1 conv + ReLU -> 1x1 conv to class logits."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(d_encoder, d_encoder, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(d_encoder, num_classes, 1),
    )


class RankSegHead(MaskDecoderBase):
    output_names = ("logits", "class_index", "image_logits")

    def __init__(self, cfg: HeadConfig, num_classes: int, d_encoder: int) -> None:
        super().__init__(cfg, num_classes, d_encoder, cfg.n_layers)
        self.topk = cfg.topk
        self.downsample = cfg.downsample
        self.multilabel_head = cfg.multilabel_head
        self.mask_norm = nn.LayerNorm(cfg.topk, eps=cfg.norm_eps)  # rank-adaptive: affine per rank slot
        if cfg.multilabel_head == "encoder_layer":
            self.decoder_norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
            self.ml_fc = GroupWiseLinear(num_classes, cfg.d_model)
        self.reset_parameters()
        if cfg.multilabel_head == "encoder_layer" and cfg.image_prior_prob is not None:
            # Every class starts at the prior p (RetinaNet's init): a rare class's score need not first fall from
            # about 0.5. A constant, no random draw: the other weights are the same as without it.
            nn.init.constant_(self.ml_fc.b, -math.log((1 - cfg.image_prior_prob) / cfg.image_prior_prob))
        # Built after the generic init so GroupWiseLinear and the convs keep their own initialisation; as in the
        # reference, Linear/LayerNorm layers of the Query2Label transformer get the head's init (in_proj stays
        # xavier).
        if cfg.multilabel_head == "query2label":
            self.img_cls_head = Query2LabelClassifier(d_encoder, cfg.d_model, num_classes, cfg.downsample, cfg)
            self.img_cls_head.transformer.apply(init_transformer_weights)
        elif cfg.multilabel_head == "global_pool":
            self.img_cls_head = global_pool_classifier(d_encoder, num_classes)

    @property
    def seg_blocks(self) -> nn.ModuleList:
        return self.blocks[1:] if self.multilabel_head == "encoder_layer" else self.blocks

    @property
    def multilabel_block(self) -> Block | None:
        """``encoder_layer``: block 0 on [pooled patch tokens; all N class tokens]; the other branches have none."""
        return self.blocks[0] if self.multilabel_head == "encoder_layer" else None

    def forward(self, feature_map: Tensor, backbone_classes: Tensor | None = None) -> SegOutput:
        B, _, h, w = feature_map.shape
        patches = self.proj_dec(tokens_of(feature_map))
        if self.multilabel_head == "encoder_layer":
            classes = self.class_embeddings(B, backbone_classes)
            if self.downsample is None:
                ml_tokens = patches
            else:
                ml_tokens = self.proj_dec(tokens_of(adaptive_avg_pool2d(feature_map, self.downsample)))
            y = self.blocks[0](torch.cat([ml_tokens, classes], dim=1))
            class_feats = self.decoder_norm2(y[:, ml_tokens.shape[1] :])
            image_logits = self.ml_fc(class_feats)
            if self.downsample is None:
                patches = y[:, : ml_tokens.shape[1]]
        else:
            pooled = adaptive_avg_pool2d(feature_map, self.downsample)
            if self.multilabel_head == "query2label":
                image_logits = self.img_cls_head(pooled, self.cls_emb[0])
            else:
                image_logits = self.img_cls_head(pooled).flatten(1)
            class_feats = self.cls_emb.expand(B, -1, -1)
        class_index = image_logits.topk(self.topk, dim=1).indices
        selected = class_feats.gather(1, class_index[..., None].expand(-1, -1, class_feats.shape[-1]))
        p, c = self.cosine_masks(patches, selected, self.seg_blocks)
        masks = self.mask_norm(p @ c.transpose(1, 2))
        return SegOutput(to_grid(masks, (h, w)), self.num_classes, class_index, image_logits)


class SelectedLayerNorm(nn.Module):
    """GT-oracle normalisation over the g selected scores: unbiased variance, affine by slot, and the constant
    beta[0] when only one class is selected (all as in the reference)."""

    def __init__(self, num_classes: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(num_classes))
        self.beta = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (B, L, g) scores, valid (B, g) bool (padding slots False)."""
        g = x.shape[-1]
        v = valid[:, None, :].to(x.dtype)
        n = v.sum(-1, keepdim=True)
        mean = (x * v).sum(-1, keepdim=True) / n
        var = ((x - mean) ** 2 * v).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
        out = (x - mean) / torch.sqrt(var + self.eps) * self.gamma[:g] + self.beta[:g]
        return torch.where(n == 1, self.beta[0].expand_as(out), out)


class RankSegGTHead(MaskDecoderBase):
    """GT oracle: the classes present in the label replace the predicted top-k (ascending class ids)."""

    needs_present_classes = True
    output_names = ("logits", "class_index")

    def __init__(self, cfg: HeadConfig, num_classes: int, d_encoder: int) -> None:
        super().__init__(cfg, num_classes, d_encoder, cfg.n_layers)
        self.mask_norm = SelectedLayerNorm(num_classes, eps=cfg.norm_eps)
        self.reset_parameters()

    def forward(
        self, feature_map: Tensor, backbone_classes: Tensor | None = None, present: Tensor | None = None
    ) -> SegOutput:
        if present is None:
            raise ValueError("the GT-oracle head needs the classes present in each image")
        B, _, h, w = feature_map.shape
        class_index = present_to_index(present)
        valid = class_index >= 0
        patches = self.proj_dec(tokens_of(feature_map))
        classes = self.class_embeddings(B, backbone_classes)
        selected = classes.gather(1, class_index.clamp(min=0)[..., None].expand(-1, -1, classes.shape[-1]))
        key_mask = None
        if not bool(valid.all()):
            key_mask = torch.cat([valid.new_ones(B, patches.shape[1]), valid], dim=1)
        p, c = self.cosine_masks(patches, selected, self.blocks, key_mask)
        masks = self.mask_norm(p @ c.transpose(1, 2), valid)
        masks = masks.masked_fill(~valid[:, None, :], FILL_LOGIT)
        return SegOutput(to_grid(masks, (h, w)), self.num_classes, class_index)


def present_to_index(present: Tensor) -> Tensor:
    """(B, N) bool -> (B, g_max) ascending class ids padded with -1; an image with none gets class 0."""
    present = present.bool().clone()
    present[~present.any(1), 0] = True
    B, N = present.shape
    ids = torch.arange(N, device=present.device).expand(B, N)
    ids = torch.where(present, ids, N).sort(dim=1).values[:, : int(present.sum(1).max())]
    return torch.where(ids == N, -1, ids)
