"""Named seed streams keep every seed of earlier versions: a run resumed or repeated with a later segrank draws the
same samples, augmentations and dropout masks (values computed with the unnamed stream numbers 1, 2 and 3)."""

from __future__ import annotations

from segrank.training.sampling import SampleStream, SeedStream, derive_seed


def test_sample_order_and_augmentation_seeds_are_unchanged():
    stream = SampleStream(7, seed=3)
    assert [stream[p] for p in range(9)] == [
        (6, 2930978690), (4, 1620210449), (5, 4279062613), (3, 1631191312), (2, 3236180052), (0, 1019788328),
        (1, 1951860232), (0, 2979199701), (4, 1939739942)]


def test_forward_seed_is_unchanged_and_streams_differ():
    assert derive_seed(3, 5, 1, 0, SeedStream.FORWARD) == 477812309
    assert len({derive_seed(3, 5, stream) for stream in SeedStream}) == len(SeedStream)
