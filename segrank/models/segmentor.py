"""The whole model: ViT backbone + decode head, with input padding semantics and the training loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segrank.config import ModelConfig, model_config_from
from segrank.config.inference import InferenceConfig
from segrank.models import losses as L
from segrank.models.heads import build_head
from segrank.models.output import DecodeHead, SegOutput
from segrank.models.pixel_losses import pixel_loss
from segrank.models.rankseg_head import SelectedLayerNorm
from segrank.models.vit import VisionTransformer

# Normalisation layers, whose parameters the optimiser's norm_decay_mult rule names.
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, SelectedLayerNorm)


def standard_layout(grad: Tensor) -> Tensor:
    """The gradient of a parameter in the parameter's own (row-major) layout.

    A token table such as ``cls_token`` (1, 1, d) is expanded over the batch and concatenated to the sequence; with
    one image per process the expand is the identity, so its gradient is a slice of the sequence's gradient, whose
    stride on the size-1 dimension is the sequence's. Autograd accepts that layout, but DDP lays its gradient buckets
    out like the parameter and warns on every such copy ("grad strides do not match bucket view strides"). A copy in
    the standard layout (a few KB per step) makes the two agree.
    """
    expected, step = [], 1
    for size in reversed(grad.shape):
        expected.insert(0, step)
        step *= size
    return grad if list(grad.stride()) == expected else grad.clone(memory_format=torch.contiguous_format)


class Segmentor(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.patch_size = cfg.backbone.patch_size
        self.backbone = VisionTransformer(cfg.backbone, num_classes=cfg.num_classes)
        self.decode_head: DecodeHead = build_head(cfg)
        # Test settings the model's checkpoint carries (set by the checkpoint loaders and by training), so that a
        # model handed to a Predictor segments as it did where it was trained.
        self.inference: InferenceConfig | None = None
        for param in self.parameters():
            if 1 in param.shape:  # token tables (1, n, d): see standard_layout
                param.register_hook(standard_layout)

    @property
    def needs_present_classes(self) -> bool:
        """GT-oracle models take the classes present in each image as a second input."""
        return self.decode_head.needs_present_classes

    def forward(self, images: Tensor, present: Tensor | None = None) -> SegOutput:
        """images (B, 3, H, W) normalised -> patch-grid SegOutput (sparse for RankSeg).

        present: (B, num_classes) bool, the classes in each image's label (GT-oracle models only).
        """
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise TypeError(f"Segmentor takes a normalised (B, 3, H, W) tensor, got {describe_input(images)}; "
                            "segrank.Predictor segments image files, PIL images and arrays")
        features = self.backbone(images)
        if self.needs_present_classes:
            return self.decode_head(features.feature_map, features.class_tokens, present)
        return self.decode_head(features.feature_map, features.class_tokens)

    def to_input_size(self, logits: Tensor, input_size: tuple[int, int]) -> Tensor:
        """Map patch-grid logits (B, C, h, w) of a padded input back onto the unpadded input (H, W).

        ``stretch`` (mmseg fork): resize the padded grid directly to (H, W). ``crop`` (official Segmenter):
        upsample to the padded size, then crop.
        """
        H, W = input_size
        if self.cfg.padding == "stretch":
            return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        h, w = logits.shape[2:]
        full = F.interpolate(logits, size=(h * self.patch_size, w * self.patch_size), mode="bilinear",
                             align_corners=False)
        return full[:, :, :H, :W]

    def dense_logits(
        self, images: Tensor, out_size: tuple[int, int] | None = None, present: Tensor | None = None
    ) -> Tensor:
        """(B, N, h, w) logits at the patch grid, or mapped to the input and resized to ``out_size``.

        RankSeg models give their parity form: -100 for unselected classes.
        """
        logits = self(images, present).dense()
        if out_size is None:
            return logits
        input_size = (images.shape[2], images.shape[3])
        logits = self.to_input_size(logits, input_size)
        if tuple(out_size) != input_size:
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits

    def class_map(
        self, images: Tensor, out_size: tuple[int, int] | None = None, present: Tensor | None = None
    ) -> Tensor:
        """(B, H, W) int64 class ids at ``out_size`` (default: the input size)."""
        return self.output_to_class_map(self(images, present), (images.shape[2], images.shape[3]), out_size)

    def output_to_class_map(
        self, output: SegOutput, input_size: tuple[int, int], out_size: tuple[int, int] | None = None
    ) -> Tensor:
        """Argmax class ids of a forward output, mapped onto the input and resized to ``out_size``.

        RankSeg resizes and compares only its k slot channels, then maps slots back to class ids: the same argmax
        as the dense -100-filled logits, at a fraction of the cost for large vocabularies. Channels-last layout
        makes the resize and the per-pixel argmax read contiguous memory (2x faster at 1284 classes).
        """
        logits = self.to_input_size(output.mask_logits.contiguous(memory_format=torch.channels_last), input_size)
        if out_size is not None and tuple(out_size) != tuple(input_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        pred = logits.argmax(1)
        if not output.is_sparse:
            return pred
        return output.class_index.gather(1, pred.flatten(1)).view_as(pred)

    def loss(self, output: SegOutput, labels: Tensor, ignore_index: int) -> dict[str, Tensor]:
        """Training losses and metrics. labels (B, H, W) int class ids at input resolution.

        Returns ``loss`` (the total to back-propagate), ``loss_seg``, ``loss_img`` (weighted, RankSeg only) and
        the logged metrics, fractions in [0, 1] (docs/metrics.md): ``pixel_acc``, and for RankSeg/GT
        ``pixel_recall``, ``image_recall``, ``image_precision``.
        """
        cfg = self.cfg.loss
        labels = labels.long()
        input_size = (labels.shape[-2], labels.shape[-1])
        logits = self.to_input_size(output.mask_logits, input_size)
        out: dict[str, Tensor] = {}
        if not output.is_sparse:
            target = labels
        else:
            target = L.rank_remap(labels, output.class_index, self.num_classes, ignore_index)
        out["loss_seg"] = pixel_loss(logits, target, ignore_index, cfg, output.class_index)
        out["pixel_acc"] = L.pixel_accuracy(logits.detach(), target)
        total = out["loss_seg"]
        if output.image_logits is not None:
            presence = L.presence_targets(labels, self.num_classes, ignore_index)
            if cfg.image_loss == "bce":
                img_loss = L.bce_image_loss(output.image_logits, presence, cfg.image_reduction)
            else:
                img_loss = L.asymmetric_loss(output.image_logits, presence, cfg.asl_gamma_neg, cfg.asl_gamma_pos,
                                             cfg.asl_clip, cfg.asl_eps, cfg.image_reduction)
            out["loss_img"] = img_loss * cfg.image_loss_weight
            total = total + out["loss_img"]
        if output.is_sparse:
            with torch.no_grad():
                hist = L.class_histogram(labels, self.num_classes, ignore_index)
                out["pixel_recall"] = L.pixel_recall(hist, output.class_index)
                out["image_recall"] = L.image_recall(hist, output.class_index)
                out["image_precision"] = L.image_precision(hist, output.class_index)
        out["loss"] = total
        return out

    def norm_parameter_names(self) -> set[str]:
        """The parameters of normalisation layers (LayerNorm, GroupNorm, the GT oracle's SelectedLayerNorm): those
        the optimiser's ``norm_decay_mult`` applies to."""
        return {f"{prefix}.{name}" if prefix else name for prefix, module in self.named_modules()
                if isinstance(module, NORM_LAYERS) for name, _ in module.named_parameters(recurse=False)}

    def bias_parameter_names(self) -> set[str]:
        """The biases (``*.bias``) of the layers that are not normalisation layers: those the optimiser's
        ``bias_decay_mult`` applies to."""
        norms = self.norm_parameter_names()
        return {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] == "bias" and name not in norms}


def describe_input(value: object) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")


def build_model(config: ModelConfig | dict | str) -> Segmentor:
    """A freshly initialised model from a ModelConfig, a dict or a YAML path."""
    return Segmentor(model_config_from(config))
