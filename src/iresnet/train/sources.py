"""Training batches as a pure function of the step, so that a resumed run sees exactly the
batches the uninterrupted run would have seen; under ``torch.distributed`` each process takes
its share (rows ``rank::world``) of the same global batch."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import Tensor

from ..data.augment import random_crop_flip
from ..data.images import image_spec, load_images
from ..data.toy import sample_toy

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["DataSource", "ImageData", "ImageSource", "ToySource", "make_source", "run_source"]

_TEST_SEED = 20190612  # one test set for every toy run, whatever its training seed


def _generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """The generator of draw ``index`` (a step or an epoch) of one of a run's random streams."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index + stream * 2**40)


_ORDER, _LABELLED_ORDER, _AUGMENT = 0, 1, 2  # the image source's random streams
_AUGMENT_PAD = 4  # pixels of zero padding for the random crops
_SUBSET_SEED = 20240101  # one labelled subset for every run with the same fraction, whatever its seed


class DataSource:
    """``batch(step)`` for training and ``test`` (a fixed tensor) for evaluation. ``is_image``
    tells labelled integer images (with ``levels``, ``labelled_batch``, ``train``, ``test_labels``,
    typed by :meth:`image_data`) from toy 2-D points; :func:`make_source` decides it, by
    :func:`~iresnet.data.image_spec`."""

    name: str
    event_shape: tuple[int, ...]
    levels: int | None  # intensity levels of image data, None for continuous data
    test: Tensor
    is_image: bool

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Tensor:
        raise NotImplementedError

    @property
    def event_size(self) -> int:
        return math.prod(self.event_shape)

    def image_data(self) -> ImageData:
        """This source as the labelled images it holds; ``ValueError`` for one without (not ``is_image``)."""
        if not self.is_image:
            raise ValueError(f"{self.name!r} holds no labelled images")
        return cast(ImageData, self)  # what is_image promises


class ImageData(Protocol):
    """A source of labelled integer images (``is_image``) as :meth:`DataSource.image_data` gives it:
    its intensity ``levels`` (never ``None``), the training and test images and their labels, the
    indices of the ``labelled`` training images, and :meth:`labelled_batch`."""

    name: str
    levels: int
    train: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor
    labelled: Tensor

    def labelled_batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]: ...


class ToySource(DataSource):
    """Fresh samples of a toy density at every step; ``eval_size`` fixed test samples."""

    is_image = False

    def __init__(self, name: str, seed: int, eval_size: int) -> None:
        self.name, self.seed, self.event_shape, self.levels = name, seed, (2,), None
        self.test = sample_toy(name, eval_size, torch.Generator().manual_seed(_TEST_SEED))

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Tensor:
        return sample_toy(self.name, batch_size, _generator(self.seed, step))[rank::world]


class ImageSource(DataSource):
    """Epochs over the training images in an order drawn from the seed and the epoch; the last
    incomplete batch of an epoch is dropped.

    ``augment`` crops and flips every training batch (:func:`~iresnet.data.augment.random_crop_flip`,
    4 pixels of padding), drawn from the seed and the step. ``labelled_fraction`` keeps the labels
    of that fraction of the training images, the same in every class (the first of a fixed
    permutation per class); :meth:`labelled_batch` draws from them alone, :meth:`batch` from all.
    """

    is_image = True

    def __init__(
        self,
        name: str,
        seed: int,
        root: str | None = None,
        download: bool = False,
        *,
        augment: bool = False,
        labelled_fraction: float = 1.0,
    ) -> None:
        spec = image_spec(name)
        if spec is None:
            raise ValueError(f"{name!r} is not an image data set")
        self.name, self.seed, self.event_shape, self.levels = name, seed, spec.shape, spec.levels
        self.augment = augment
        self.train, self.train_labels = load_images(name, root, train=True, download=download)
        self.test, self.test_labels = load_images(name, root, train=False, download=download)
        self.labelled = _labelled_subset(self.train_labels, labelled_fraction)
        self._orders: dict[int, tuple[int, Tensor]] = {}

    def _rows(self, pool: int, size: int, step: int, batch_size: int) -> Tensor:
        """Rows (positions in a pool of ``size`` items) of this step's global batch."""
        per_epoch = size // batch_size
        if per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {size} training images it draws from")
        epoch, index = divmod(step, per_epoch)
        if pool not in self._orders or self._orders[pool][0] != epoch:
            self._orders[pool] = (epoch, torch.randperm(size, generator=_generator(self.seed, epoch, pool)))
        return self._orders[pool][1][index * batch_size : (index + 1) * batch_size]

    def _share(self, rows: Tensor, step: int, stream: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
        """This process's share of the global batch of ``rows``, augmented as a whole first (so
        that the global batch does not depend on the number of processes), with its labels."""
        images = self.train[rows]
        if self.augment:
            images = random_crop_flip(images, _AUGMENT_PAD, _generator(self.seed, step, _AUGMENT + stream))
        return images[rank::world], self.train_labels[rows][rank::world]

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Tensor:
        """This step's training images (all of them, labelled or not)."""
        return self._share(self._rows(_ORDER, len(self.train), step, batch_size), step, 0, rank, world)[0]

    def labelled_batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        """This step's labelled training images and their labels (all images where every label is kept)."""
        if len(self.labelled) == len(self.train):
            return self._share(self._rows(_ORDER, len(self.train), step, batch_size), step, 0, rank, world)
        rows = self.labelled[self._rows(_LABELLED_ORDER, len(self.labelled), step, batch_size)]
        return self._share(rows, step, 1, rank, world)


def _labelled_subset(labels: Tensor, fraction: float) -> Tensor:
    """Indices of ``round(fraction * n_c)`` (at least 1) images of each class ``c``, sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"labelled_fraction must lie in (0, 1], got {fraction}")
    if fraction == 1:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(_SUBSET_SEED)
    order = torch.randperm(len(labels), generator=generator)
    kept = []
    for label in labels.unique():
        members = order[labels[order] == label]
        kept.append(members[: max(1, round(fraction * len(members)))])
    return torch.cat(kept).sort().values


def make_source(
    data: str,
    seed: int,
    eval_size: int,
    root: str | None = None,
    download: bool = False,
    *,
    augment: bool = False,
    labelled_fraction: float = 1.0,
) -> DataSource:
    """The source for a data set name: one of the toy densities or the image data sets (with
    :class:`ImageSource`'s ``augment`` and ``labelled_fraction``, which toy data do not take)."""
    if image_spec(data) is not None:
        return ImageSource(data, seed, root, download, augment=augment, labelled_fraction=labelled_fraction)
    if augment or labelled_fraction != 1:
        raise ValueError(f"augment and labelled_fraction are for image data, not the toy density {data!r}")
    return ToySource(data, seed, eval_size)


def run_source(config: TrainConfig) -> DataSource:
    """The data of the run ``config`` describes, as its evaluation sees them (no augmentation)."""
    return make_source(
        config.data,
        config.seed,
        config.eval_size,
        config.data_dir,
        config.download,
        labelled_fraction=config.labelled_fraction,
    )
