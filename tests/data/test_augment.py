"""Crop-and-flip augmentation, labelled subsets, and the image source's batches as a function of
the step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iresnet.data.augment import random_crop_flip
from iresnet.train.sources import ImageSource, _labelled_subset


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` (C, H, W) moved by (dy, dx) with zeros moved in: the reference, pixel by pixel."""
    c, h, w = image.shape
    out = torch.zeros_like(image)
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = image[:, i - dy, j - dx]
    return out


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(1, 3), h=st.integers(2, 7), w=st.integers(2, 7), pad=st.integers(0, 4))
def test_each_output_is_a_shifted_and_maybe_flipped_input(n: int, c: int, h: int, w: int, pad: int) -> None:
    images = torch.randint(1, 256, (n, c, h, w), dtype=torch.uint8)  # no zeros: the moved-in pixels are visible
    out = random_crop_flip(images, pad, torch.Generator().manual_seed(n * 100 + pad))
    assert out.shape == images.shape and out.dtype == torch.uint8
    for image, result in zip(images, out):
        candidates = [
            shifted(base, dy, dx)
            for base in (image, image.flip(-1))
            for dy in range(-pad, pad + 1)
            for dx in range(-pad, pad + 1)
        ]
        assert any(torch.equal(result, candidate) for candidate in candidates)


def test_draws_cover_every_shift_and_both_flips() -> None:
    image = torch.arange(1, 26, dtype=torch.uint8).reshape(1, 1, 5, 5)
    out = random_crop_flip(image.expand(2000, 1, 5, 5), 1, torch.Generator().manual_seed(0))
    assert len(out.unique(dim=0)) == 2 * 9  # 3 x 3 shifts, flipped or not
    moved = (out[:, 0, 2, 2] != 13).float().mean()  # the centre pixel changes unless the shift is (0, 0)
    assert abs(moved - 8 / 9) < 0.03
    same = random_crop_flip(image.expand(50, 1, 5, 5), 1, torch.Generator().manual_seed(3))
    assert torch.equal(same, random_crop_flip(image.expand(50, 1, 5, 5), 1, torch.Generator().manual_seed(3)))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        random_crop_flip(torch.zeros(3, 4, 4), 1, torch.Generator())
    with pytest.raises(ValueError, match="non-negative"):
        random_crop_flip(torch.zeros(1, 1, 4, 4), -1, torch.Generator())


def test_labelled_subset_keeps_the_fraction_of_every_class() -> None:
    labels = torch.arange(10).repeat_interleave(torch.arange(20, 30))  # class c has 20 + c members
    kept = _labelled_subset(labels, 0.1)
    counts = torch.bincount(labels[kept], minlength=10)
    assert counts.tolist() == [round(0.1 * (20 + c)) for c in range(10)]
    assert torch.equal(kept, _labelled_subset(labels, 0.1))  # the same subset every time
    assert torch.equal(_labelled_subset(labels, 1.0), torch.arange(len(labels)))
    with pytest.raises(ValueError, match="labelled_fraction"):
        _labelled_subset(labels, 0.0)


def test_labelled_batches_come_from_the_subset_and_batches_from_all() -> None:
    source = ImageSource("digits", seed=0, labelled_fraction=0.1)
    assert len(source.labelled) == 150  # 10% of 1,500 in every class, rounded
    allowed = set(source.labelled.tolist())
    seen_labelled, seen_all = set(), set()
    for step in range(6):
        x, y = source.labelled_batch(step, 32)
        rows = [int(((source.train == image).flatten(1).all(1)).nonzero()[0]) for image in x]
        assert all(source.train_labels[r] == label for r, label in zip(rows, y))
        seen_labelled |= set(rows)
        seen_all |= {int(((source.train == image).flatten(1).all(1)).nonzero()[0]) for image in source.batch(step, 32)}
    assert seen_labelled <= allowed
    assert not seen_all <= allowed


def test_augmented_batches_are_a_function_of_the_step() -> None:
    plain = ImageSource("digits", seed=0)
    augmented = ImageSource("digits", seed=0, augment=True)
    x, y = augmented.labelled_batch(5, 16)
    again = ImageSource("digits", seed=0, augment=True)
    assert torch.equal(again.labelled_batch(5, 16)[0], x)  # a fresh source gives step 5 the same batch
    assert torch.equal(plain.labelled_batch(5, 16)[1], y)  # the same images, augmented
    assert not torch.equal(plain.labelled_batch(5, 16)[0], x)


def test_each_process_takes_its_share_of_the_same_augmented_global_batch() -> None:
    for fraction in (1.0, 0.2):
        source = ImageSource("digits", seed=0, augment=True, labelled_fraction=fraction)
        whole, labels = source.labelled_batch(3, 8)
        for rank in range(2):
            share, share_labels = source.labelled_batch(3, 8, rank, 2)
            assert torch.equal(share, whole[rank::2]) and torch.equal(share_labels, labels[rank::2])
            assert torch.equal(source.batch(3, 8, rank, 2), source.batch(3, 8)[rank::2])
