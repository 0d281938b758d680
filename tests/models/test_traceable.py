"""The model pieces that keep an export general in H/W give the same numbers as the eager paths they stand for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segrank.models.pooling import bin_matrix, explicit_adaptive_avg_pool2d
from segrank.models.vit import PatchEmbed, resample_pos_embed


@pytest.mark.parametrize("bins", [1, 3, 5, 8])
def test_explicit_adaptive_pool_equals_pytorch(bins):
    """Every input size from 1 to 40, below, at and above the bin count (overlapping and disjoint bins)."""
    g = torch.Generator().manual_seed(bins)
    for h in range(1, 41, 3):
        for w in (1, 2, 7, 16, 33):
            x = torch.randn(2, 4, h, w, generator=g)
            torch.testing.assert_close(explicit_adaptive_avg_pool2d(x, bins), F.adaptive_avg_pool2d(x, bins),
                                       rtol=0, atol=1e-6)


def test_bin_matrix_covers_pytorch_bins():
    """Row i marks [floor(i*n/o), ceil((i+1)*n/o)): each input is in at least one bin, bins are contiguous."""
    m = bin_matrix(7, 3, torch.device("cpu"))
    assert m.tolist() == [[1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]]


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_position_resize_at_equal_grid_is_exact_identity(mode, monkeypatch):
    """Exports always resize the table; at the table's own grid that must change no bit."""
    table = torch.randn(1, 1 + 5 * 7, 8)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert torch.equal(resample_pos_embed(table, (5, 7), (5, 7), mode), table)


def test_patch_embed_padding_by_zero_is_a_no_op():
    embed = PatchEmbed(8, 3, 4)
    x = torch.randn(1, 3, 24, 21)
    padded = torch.cat([x, torch.zeros(1, 3, 24, 3)], dim=3)
    assert torch.equal(embed(x), embed.proj(padded))
    assert torch.equal(embed(padded), embed.proj(padded))
