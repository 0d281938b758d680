"""Recorded attention weights are the ones the fused kernel applies: a block's output with a recorder equals its fused
output and equals what the recorded weights give when applied to the values by hand; a whole model returns the same
numbers with every attention layer recorded."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from segrank import build_model
from segrank.config import ModelConfig, from_dict
from segrank.models.blocks import Attention, AttentionRecorder, Block, attention_weights, recording


def keep_all(store: list[torch.Tensor]) -> AttentionRecorder:
    return AttentionRecorder(rows=lambda length: slice(None), store=store.append)


def by_hand(block: Block, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The block's output computed from ``weights`` (B, heads, L, L): weights @ v, projection, residual, MLP."""
    B, L, D = x.shape
    attn = block.attn
    v = attn.qkv(block.norm1(x)).view(B, L, 3, attn.num_heads, D // attn.num_heads)[:, :, 2].transpose(1, 2)
    y = x + attn.proj((weights @ v).transpose(1, 2).reshape(B, L, D))
    return y + block.mlp(block.norm2(y))


@pytest.mark.parametrize("masked", [False, True])
def test_block_output_is_the_recorded_weights_applied_to_the_values(masked):
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=4, mlp_dim=64).eval()
    x = torch.randn(2, 11, 32)
    key_mask = torch.ones(2, 11, dtype=torch.bool)
    if masked:
        key_mask[0, -3:] = False  # padding tokens no query may attend to
    fused = block(x, key_mask)
    store: list[torch.Tensor] = []
    with recording(block.attn, keep_all(store)):
        recorded = block(x, key_mask)
    (weights,) = store
    assert weights.shape == (2, 4, 11, 11) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 11))
    assert torch.equal(recorded, fused)  # recording leaves the fused path's numbers alone
    torch.testing.assert_close(by_hand(block, x, weights), fused, atol=1e-5, rtol=1e-5)
    if masked:
        assert torch.all(weights[0, :, :, -3:] == 0) and torch.all(weights[1, :, :, -3:] > 0)
    # wrong weights would not reproduce the output: the comparison can fail
    shuffled = weights.roll(1, dims=-1)
    assert not torch.allclose(by_hand(block, x, shuffled), fused, atol=1e-3)


def test_a_recorder_gets_the_rows_it_asks_for_only():
    torch.manual_seed(1)
    attention = Attention(dim=16, num_heads=2).eval()
    x = torch.randn(1, 9, 16)
    full: list[torch.Tensor] = []
    with recording(attention, keep_all(full)):
        attention(x)
    some: list[torch.Tensor] = []
    rows = torch.tensor([7, 2])
    with recording(attention, AttentionRecorder(rows=lambda length: rows, store=some.append)):
        attention(x)
    assert some[0].shape == (1, 2, 2, 9)
    torch.testing.assert_close(some[0], full[0][:, :, rows])


def test_weights_under_autocast_are_float32_softmax_of_the_same_scores():
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights = attention_weights(q, k)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, expected)


def test_recording_is_undone_and_not_nested():
    attention = Attention(dim=8, num_heads=2)
    recorder = AttentionRecorder(rows=lambda length: slice(None), store=lambda w: None)
    with pytest.raises(ZeroDivisionError), recording(attention, recorder):
        1 / 0  # noqa: B018
    assert attention.recorder is None
    with recording(attention, recorder), pytest.raises(RuntimeError, match="already being recorded"), \
            recording(attention, recorder):
        pass
    assert attention.recorder is None


@pytest.mark.parametrize("head", ["segmenter", "rankseg", "rankseg_full_patches"])
def test_model_outputs_are_the_same_with_every_attention_layer_recorded(head):
    downsample = None if head == "rankseg_full_patches" else 2
    cfg = from_dict(ModelConfig, {
        "num_classes": 9,
        "backbone": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "pos_embed_grid": [4, 4]},
        "head": {"type": head.split("_")[0], "topk": 4, "downsample": downsample, "n_layers": 2}})
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        plain = model(images)
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        stored: list[torch.Tensor] = []
        with ExitStack() as stack:
            for layer in layers:
                stack.enter_context(recording(layer, keep_all(stored)))
            recorded = model(images)
    assert len(stored) == len(layers) == 4  # 2 ViT blocks, 2 head blocks (RankSeg: its multi-label layer and one)
    assert torch.equal(recorded.mask_logits, plain.mask_logits)
    if head != "segmenter":
        assert torch.equal(recorded.class_index, plain.class_index)
        assert torch.equal(recorded.image_logits, plain.image_logits)
