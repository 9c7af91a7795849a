"""Training batches as a pure function of the step, so that a resumed run sees exactly the
batches the uninterrupted run would have seen; under ``torch.distributed`` each process takes
its share (rows ``rank::world``) of the same global batch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..data.toy import TOY_DATASETS, sample_toy

__all__ = ["DataSource", "ToySource", "ImageSource", "make_source"]

_TEST_SEED = 20190612  # one test set for every toy run, whatever its training seed


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


class DataSource:
    """``batch(step)`` for training and ``test`` (a fixed tensor) for evaluation."""

    name: str
    event_shape: tuple[int, ...]
    levels: int | None  # intensity levels of image data, None for continuous data
    test: Tensor

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Tensor:
        raise NotImplementedError

    @property
    def event_size(self) -> int:
        return math.prod(self.event_shape)


class ToySource(DataSource):
    """Fresh samples of a toy density at every step; ``eval_size`` fixed test samples."""

    def __init__(self, name: str, seed: int, eval_size: int) -> None:
        self.name, self.seed, self.event_shape, self.levels = name, seed, (2,), None
        self.test = sample_toy(name, eval_size, torch.Generator().manual_seed(_TEST_SEED))

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Tensor:
        return sample_toy(self.name, batch_size, _generator(self.seed, step))[rank::world]


class ImageSource(DataSource):
    """Epochs over the training images in an order drawn from the seed and the epoch; the last
    incomplete batch of an epoch is dropped."""

    def __init__(self, name: str, seed: int, root: str | None = None, download: bool = False) -> None:
        from ..data.images import IMAGE_DATASETS, load_images

        spec = IMAGE_DATASETS[name]
        self.name, self.seed, self.event_shape, self.levels = name, seed, spec.shape, spec.levels
        self.train, self.train_labels = load_images(name, root, train=True, download=download)
        self.test, self.test_labels = load_images(name, root, train=False, download=download)
        self._order: tuple[int, Tensor] | None = None

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Tensor:
        return self.labelled_batch(step, batch_size, rank, world)[0]

    def labelled_batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        """The images of :meth:`batch` and their labels."""
        per_epoch = len(self.train) // batch_size
        if per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {len(self.train)} training images")
        epoch, index = divmod(step, per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, torch.randperm(len(self.train), generator=_generator(self.seed, epoch)))
        rows = self._order[1][index * batch_size : (index + 1) * batch_size][rank::world]
        return self.train[rows], self.train_labels[rows]


def make_source(data: str, seed: int, eval_size: int, root: str | None = None, download: bool = False) -> DataSource:
    """The source for a data set name: one of the toy densities or the image data sets."""
    if data in TOY_DATASETS:
        return ToySource(data, seed, eval_size)
    from ..data.images import IMAGE_DATASETS

    if data in IMAGE_DATASETS:
        return ImageSource(data, seed, root, download)
    raise ValueError(f"unknown data set {data!r}; toy: {', '.join(TOY_DATASETS)}; images: {', '.join(IMAGE_DATASETS)}")
