r"""Image data sets as integer tensors: ``images`` of shape ``(N, C, H, W)``, dtype
``torch.uint8``, values in ``{0, ..., levels - 1}``, and ``labels`` of shape ``(N,)``, int64.

Nothing here rescales or dequantises: that is :class:`~iresnet.data.UniformDequantize`'s job,
with the bits/dim convention of :mod:`iresnet.data.preprocess`.

=========  ===========  ======  =======  ==============================================
name       shape        levels  classes  source
=========  ===========  ======  =======  ==============================================
digits     (1, 8, 8)    17      10       scikit-learn's ``load_digits`` (bundled)
mnist      (1, 28, 28)  256     10       ``torchvision.datasets.MNIST``
mnist3x32  (3, 32, 32)  256     10       MNIST as the i-ResNet code lays it out
cifar10    (3, 32, 32)  256     10       ``torchvision.datasets.CIFAR10``
patches16  (3, 16, 16)  256     1        photographs in scikit-image and scikit-learn
patches32  (3, 32, 32)  256     1        photographs in scikit-image and scikit-learn
faces      (1, 24, 24)  256     2        scikit-image's ``lfw_subset`` (bundled)
=========  ===========  ======  =======  ==============================================

The last three ship inside the scikit-image and scikit-learn packages: nothing to download.
The patches are cut from eight photographs (:data:`PHOTOGRAPHS`), split by photograph: the
test patches come from :data:`TEST_PHOTOGRAPHS` alone, the training patches from the other
six, and :func:`patch_sources` names the photograph of each patch.

>>> IMAGE_DATASETS["digits"]
ImageSpec(name='digits', shape=(1, 8, 8), levels=17, classes=10)
>>> IMAGE_DATASETS["cifar10"].event_size
3072

References:
    Alpaydin, Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine Learning
    Repository, 1998, https://doi.org/10.24432/C50P49 (the 8 x 8 digits)

    LeCun, Bottou, Bengio, Haffner, "Gradient-based learning applied to document
    recognition", Proc. IEEE 86(11), 1998 (MNIST)

    Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", technical report,
    University of Toronto, 2009 (CIFAR-10)

    The photographs, with the credits their loaders give (``skimage.data.<name>`` and
    ``sklearn.datasets.load_sample_images`` docstrings, sklearn/datasets/images/README.txt):
    astronaut, Eileen Collins, NASA, public domain; chelsea, the cat, CC0 by Stefan van der
    Walt; coffee, CC0 by Rachel Michetti, courtesy of Pikolo Espresso Bar; rocket, the launch
    of DSCOVR on a Falcon 9, SpaceX, public domain; motorcycle_left and motorcycle_right, the
    stereo pair of Scharstein, Hirschmüller, Kitajima, Krathwohl, Nesic, Wang, Westling,
    "High-resolution stereo datasets with subpixel-accurate ground truth", GCPR 2014
    (Middlebury 2014), down-sampled by 4 by scikit-image; china, danielbuechele, CC BY 2.0;
    flower, vultilion, CC BY 2.0 (both on Flickr, retrieved by Robert Layton).

    Huang, Mattar, Lee, Learned-Miller, "Learning to Align from Scratch", NIPS 2012, and
    Huang, Ramesh, Berg, Learned-Miller, "Labeled Faces in the Wild", technical report 07-49,
    University of Massachusetts, Amherst, 2007 (the faces of ``lfw_subset``)
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .toy import TOY_DATASETS

__all__ = [
    "IMAGE_DATASETS",
    "PHOTOGRAPHS",
    "TEST_PHOTOGRAPHS",
    "ImageSpec",
    "image_spec",
    "load_images",
    "patch_sources",
]

DEFAULT_ROOT = "~/.cache/iresnet/data"

DIGITS_TRAIN_SIZE = 1500
DIGITS_SEED = 0

# The RGB photographs bundled in scikit-image's wheel (skimage.data; loaded without pooch) and
# scikit-learn's (load_sample_images), in the order their patches come. Left out: skimage's
# ``cat`` (the same picture as ``chelsea``), the synthetic ``colorwheel`` and ``logo``, and the
# scientific ``hubble_deep_field``, ``immunohistochemistry`` and ``retina`` (astronomy,
# microscopy and a fundus photograph, mostly black), whose statistics are not a natural scene's.
PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right", "china", "flower")
# The test photographs: one of each package. Both views of the motorcycle stay in training, so
# no scene is on both sides of the split.
TEST_PHOTOGRAPHS = ("coffee", "flower")
_PATCH_SIZES = {"patches16": 16, "patches32": 32}

FACES_TRAIN_SIZE = 150
FACES_SEED = 0
FACES_SIZE = 24


@dataclass(frozen=True)
class ImageSpec:
    """What an image data set holds: ``shape`` ``(C, H, W)`` of one image, ``levels``
    intensity levels (values ``0 .. levels - 1``) and ``classes`` labels ``0 .. classes - 1``."""

    name: str
    shape: tuple[int, int, int]
    levels: int
    classes: int

    @property
    def event_size(self) -> int:
        """``C * H * W``, the ``D`` of bits/dim."""
        channels, height, width = self.shape
        return channels * height * width


IMAGE_DATASETS: dict[str, ImageSpec] = {
    "digits": ImageSpec("digits", (1, 8, 8), levels=17, classes=10),
    "mnist": ImageSpec("mnist", (1, 28, 28), levels=256, classes=10),
    "mnist3x32": ImageSpec("mnist3x32", (3, 32, 32), levels=256, classes=10),
    "cifar10": ImageSpec("cifar10", (3, 32, 32), levels=256, classes=10),
    "patches16": ImageSpec("patches16", (3, 16, 16), levels=256, classes=1),
    "patches32": ImageSpec("patches32", (3, 32, 32), levels=256, classes=1),
    "faces": ImageSpec("faces", (1, 24, 24), levels=256, classes=2),
}


def image_spec(data: str) -> ImageSpec | None:
    """Toy or image, decided here alone: the :class:`ImageSpec` of the image data set ``data``,
    ``None`` for a toy 2-D density (:data:`~iresnet.data.TOY_DATASETS`), and ``ValueError``
    listing both kinds for any other name.

    >>> image_spec("digits").levels, image_spec("moons")
    (17, None)
    """
    if data in IMAGE_DATASETS:
        return IMAGE_DATASETS[data]
    if data in TOY_DATASETS:
        return None
    raise ValueError(f"unknown data set {data!r}; toy: {', '.join(TOY_DATASETS)}; images: {', '.join(IMAGE_DATASETS)}")


# What torchvision 0.29 reads: (folder under root, files, where the files come from).
# MNIST checks that all four uncompressed files exist (no checksum) for either split; CIFAR10
# checks the MD5 sums of all six batches and of batches.meta for either split.
_TORCHVISION_FILES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "mnist": (
        ("MNIST", "raw"),
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        "the uncompressed IDX files (gunzip the .gz archives from http://yann.lecun.com/exdb/mnist/ or a mirror)",
    ),
    "cifar10": (
        ("cifar-10-batches-py",),
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        "the python version, as extracted from cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html)",
    ),
}


def load_images(
    name: str, root: str | os.PathLike | None = None, *, train: bool = True, download: bool = False
) -> tuple[Tensor, Tensor]:
    """The training (``train=True``) or test images of ``name`` (a key of
    :data:`IMAGE_DATASETS`) as ``(images, labels)``: ``images`` uint8 of shape
    ``(N, C, H, W)`` with values in ``[0, levels - 1]``, ``labels`` int64 of shape ``(N,)``.

    - ``"digits"``: the 1797 8 x 8 images of scikit-learn's ``load_digits`` (values 0 .. 16),
      split once and for all: ``numpy.random.RandomState(0).permutation(1797)`` (NumPy's
      legacy generator, whose stream never changes), its first 1500 entries are the training
      set and its last 297 the test set, each in ascending index order. Needs scikit-learn.
    - ``"mnist"`` (60000 / 10000 images) and ``"cifar10"`` (50000 / 10000, channels RGB) are
      read by torchvision from ``root``, by default ``~/.cache/iresnet/data``: MNIST from
      ``<root>/MNIST/raw/``, CIFAR-10 from ``<root>/cifar-10-batches-py/``. ``download=True``
      fetches missing files. Missing files (after a failed download too) raise
      :class:`FileNotFoundError` naming the folder and the files expected there.
    - ``"mnist3x32"``: the same MNIST files in the layout of the i-ResNet paper's released
      code (Behrmann et al. 2019, ``CIFAR_main.py``): each digit zero-padded by 2 pixels on
      every side to 32 x 32 and its one channel repeated three times, so ``D = 3072``. Each
      copy gets its own dequantisation noise, as there; the padding and the copies are
      determined by the 784 pixels, so they add no information but count in ``D``: bits/dim
      here is not comparable with 1 x 28 x 28 figures (docs/presets.md).
    - ``"patches16"`` and ``"patches32"``: RGB patches of ``s x s`` pixels (``s`` = 16 or 32)
      of the eight photographs of :data:`PHOTOGRAPHS`, in that order, each cut on the
      non-overlapping grid that starts at its top-left pixel (rows ``s*i .. s*i + s - 1``,
      columns ``s*j .. s*j + s - 1``, row by row; the last ``H mod s`` rows and ``W mod s``
      columns are dropped). The patches of the two :data:`TEST_PHOTOGRAPHS` (coffee, flower)
      are the test set, those of the other six the training set: 6460 training and 1965 test
      patches of 16 x 16, 1592 and 476 of 32 x 32. All labels are 0 (one class);
      :func:`patch_sources` names each patch's photograph. Needs scikit-image and scikit-learn.
    - ``"faces"``: the 200 greyscale 25 x 25 images of scikit-image's ``lfw_subset`` (100 faces,
      then 100 non-faces cut from the backgrounds of the same photographs), values in
      ``[0, 1]`` rounded to ``round(255 x)``, cropped to their top-left 24 x 24 pixels (the
      last row and column dropped, so that the side halves twice), labels 1 for a face and 0
      for a non-face. Split like the digits:
      ``numpy.random.RandomState(0).permutation(200)``, its first 150 entries the training
      set and its last 50 the test set, each in ascending index order. Needs scikit-image.

    ``root`` and ``download`` are ignored by all but MNIST (both layouts) and CIFAR-10.

    Raises ``ValueError`` for an unknown ``name``, for a file that is not what it should be (an
    MNIST file that is not an IDX file of bytes holding the data its header announces, CIFAR-10
    files that do not match their published MD5 sums), naming it, or when what was read does not
    match the :class:`ImageSpec` (shape, dtype, value or label range).
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image data set {name!r}; choose one of {', '.join(IMAGE_DATASETS)}")
    spec = IMAGE_DATASETS[name]
    if name == "digits":
        images, labels = _load_digits(train)
    elif name in _PATCH_SIZES:
        images = _cut_patches(_PATCH_SIZES[name], train)[0]
        labels = torch.zeros(len(images), dtype=torch.int64)
    elif name == "faces":
        images, labels = _load_faces(train)
    else:
        directory = Path(DEFAULT_ROOT if root is None else root).expanduser()
        source = IMAGE_DATASETS["mnist"] if name == "mnist3x32" else spec
        images, labels = _load_torchvision(source, directory, train, download)
        if name == "mnist3x32":
            images = torch.nn.functional.pad(images, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
    _check(spec, images, labels)
    return images, labels


def _load_digits(train: bool) -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from error
    bunch = load_digits()
    pixels, targets = np.asarray(bunch.images), np.asarray(bunch.target)
    if not np.array_equal(pixels, np.round(pixels)):
        raise ValueError("scikit-learn's digits: expected integer pixel values")
    order = np.random.RandomState(DIGITS_SEED).permutation(len(pixels))
    chosen = np.sort(order[:DIGITS_TRAIN_SIZE] if train else order[DIGITS_TRAIN_SIZE:])
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"scikit-learn's digits: pixel values in [{pixels.min()}, {pixels.max()}] do not fit uint8")
    images = torch.from_numpy(pixels[chosen].astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(targets[chosen].astype(np.int64))
    return images, labels


def patch_sources(name: str, *, train: bool = True) -> list[str]:
    """The photograph (a name in :data:`PHOTOGRAPHS`) each patch of ``load_images(name,
    train=train)`` was cut from, in the same order, for ``name`` ``"patches16"`` or
    ``"patches32"``.

    >>> sorted(set(patch_sources("patches32", train=False)))
    ['coffee', 'flower']
    """
    if name not in _PATCH_SIZES:
        raise ValueError(f"{name!r} is not a patch data set; choose one of {', '.join(_PATCH_SIZES)}")
    return _cut_patches(_PATCH_SIZES[name], train)[1]


def _photographs() -> dict[str, np.ndarray]:
    """The photographs of :data:`PHOTOGRAPHS` as ``(H, W, 3)`` uint8 arrays, by name."""
    try:
        from skimage import data
    except ImportError as error:
        raise ImportError(
            "the patch data sets need scikit-image: pip install scikit-image (or iresnet[photos])"
        ) from error
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as error:
        raise ImportError("the patch data sets need scikit-learn: pip install scikit-learn") from error
    left, right, _ = data.stereo_motorcycle()
    samples = load_sample_images()
    by_file = {Path(file).stem: image for file, image in zip(samples.filenames, samples.images)}
    photos = {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "motorcycle_left": left,
        "motorcycle_right": right,
        "china": by_file["china"],
        "flower": by_file["flower"],
    }
    for key, photo in photos.items():
        photo = np.asarray(photo)
        if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
            raise ValueError(f"photograph {key!r}: expected uint8 RGB (H, W, 3), got {photo.dtype} {photo.shape}")
        photos[key] = photo
    return photos


def _cut_patches(size: int, train: bool) -> tuple[Tensor, list[str]]:
    """The ``size x size`` patches of the training or test photographs on each one's
    non-overlapping grid from its top-left pixel, ``(N, 3, size, size)``, and their sources."""
    photos = _photographs()
    patches, sources = [], []
    for key in PHOTOGRAPHS:
        if (key in TEST_PHOTOGRAPHS) == train:
            continue
        photo = photos[key]
        rows, columns = photo.shape[0] // size, photo.shape[1] // size
        grid = photo[: rows * size, : columns * size].reshape(rows, size, columns, size, 3)
        patches.append(grid.transpose(0, 2, 4, 1, 3).reshape(rows * columns, 3, size, size))
        sources += [key] * (rows * columns)
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(patches))), sources


def _load_faces(train: bool) -> tuple[Tensor, Tensor]:
    try:
        from skimage import data
    except ImportError as error:
        raise ImportError(
            "the 'faces' data set needs scikit-image: pip install scikit-image (or iresnet[photos])"
        ) from error
    pixels = np.asarray(data.lfw_subset(), dtype=np.float64)
    if pixels.shape != (200, 25, 25) or pixels.min() < 0 or pixels.max() > 1:
        raise ValueError(f"scikit-image's lfw_subset: expected 200 x 25 x 25 values in [0, 1], got {pixels.shape}")
    targets = np.repeat(np.array([1, 0], dtype=np.int64), 100)  # 100 faces, then 100 non-faces
    order = np.random.RandomState(FACES_SEED).permutation(len(pixels))
    chosen = np.sort(order[:FACES_TRAIN_SIZE] if train else order[FACES_TRAIN_SIZE:])
    cropped = np.round(pixels[chosen, :FACES_SIZE, :FACES_SIZE] * 255).astype(np.uint8)
    return torch.from_numpy(cropped).unsqueeze(1), torch.from_numpy(targets[chosen])


def _load_torchvision(spec: ImageSpec, root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    try:
        from torchvision import datasets
    except ImportError as error:
        raise ImportError(f"the {spec.name!r} data set needs torchvision: pip install torchvision") from error
    subfolders, files, origin = _TORCHVISION_FILES[spec.name]
    folder = root.joinpath(*subfolders)
    dataset_class = datasets.MNIST if spec.name == "mnist" else datasets.CIFAR10
    if spec.name == "mnist":  # torchvision reads them unchecked (an AssertionError at best)
        split = "train" if train else "t10k"
        for kind, dimensions in (("images-idx3", 3), ("labels-idx1", 1)):
            path = folder / f"{split}-{kind}-ubyte"
            if path.is_file():
                _check_idx(path, dimensions)
    try:
        dataset = dataset_class(str(root), train=train, download=download)
    except (RuntimeError, OSError) as error:
        # torchvision raises RuntimeError when files are missing or fail their checksum, and
        # RuntimeError or URLError (an OSError) when a download fails.
        missing = [file for file in files if not (folder / file).is_file()]
        corrupted = _failing_checksums(dataset_class, folder) if spec.name == "cifar10" and not missing else []
        if corrupted:
            raise ValueError(
                f"{', '.join(str(folder / file) for file in corrupted)}: not the files of CIFAR-10's python "
                "version (their MD5 sums differ from the published ones; a partial or corrupted copy?). Delete "
                "them and fetch CIFAR-10 again with download=True (--download on the command line)"
            ) from error
        if not missing:
            raise RuntimeError(
                f"torchvision could not load {spec.name} from {folder} although {', '.join(files)} are all there "
                f"(a partial or corrupted copy? CIFAR-10's files must match their published MD5 sums): {error}"
            ) from error
        absent = "none of them is there" if len(missing) == len(files) else f"missing: {', '.join(missing)}"
        message = (
            f"{spec.name} not found: expected {origin} in {folder}{os.sep}: {', '.join(files)} "
            f"(all of them, for either split); {absent}. "
        )
        if download:
            message += f"The download failed ({type(error).__name__}: {error}); are you offline?"
        else:
            message += "Pass download=True when online to fetch them."
        raise FileNotFoundError(message) from error
    if spec.name == "mnist":
        images = torch.as_tensor(dataset.data).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
    else:
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> NCHW
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return images, labels


def _check_idx(path: Path, dimensions: int) -> None:
    """Raise ``ValueError`` unless ``path`` is an IDX file of unsigned bytes with ``dimensions``
    dimensions (magic number ``00 00 08 0d``, then each size as a big-endian int32) holding
    exactly the bytes its sizes announce."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        header = file.read(4 + 4 * dimensions)
    magic = bytes([0, 0, 8, dimensions])
    problem = None
    if size == 0:
        problem = "the file is empty"
    elif header[:4] != magic:
        problem = f"it starts with {header[:4].hex(' ')}, not the IDX magic number {magic.hex(' ')}"
    elif len(header) < 4 + 4 * dimensions:
        problem = f"its header stops after {len(header)} bytes"
    else:
        sizes = struct.unpack(f">{dimensions}I", header[4:])
        expected = len(header) + math.prod(sizes)
        if size != expected:
            announced = " x ".join(map(str, sizes))
            problem = f"its header announces {announced} bytes of data, {expected} bytes in all, and it holds {size}"
    if problem is not None:
        raise ValueError(
            f"{path} is not a valid MNIST file (IDX format): {problem}. Delete it and fetch MNIST again with "
            "download=True (--download on the command line)"
        )


class _ChecksummedFiles(Protocol):
    """A torchvision data set class that lists its files with their MD5 sums (CIFAR-10's)."""

    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]


def _failing_checksums(dataset_class: _ChecksummedFiles, folder: Path) -> list[str]:
    """The CIFAR-10 files in ``folder`` that do not match the MD5 sums torchvision checks."""
    from torchvision.datasets.utils import check_integrity

    expected = [*dataset_class.train_list, *dataset_class.test_list]
    expected.append([dataset_class.meta["filename"], dataset_class.meta["md5"]])
    return [name for name, md5 in expected if not check_integrity(str(folder / name), md5)]


def _check(spec: ImageSpec, images: Tensor, labels: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != spec.shape:
        raise ValueError(
            f"{spec.name}: expected uint8 images of shape (N, {', '.join(map(str, spec.shape))}), "
            f"got {images.dtype} of shape {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{spec.name}: no images were loaded")
    if labels.dtype != torch.int64 or tuple(labels.shape) != (images.shape[0],):
        raise ValueError(
            f"{spec.name}: expected int64 labels of shape ({images.shape[0]},), "
            f"got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if images.max() > spec.levels - 1:
        raise ValueError(f"{spec.name}: expected values in [0, {spec.levels - 1}], got up to {images.max().item()}")
    if labels.min() < 0 or labels.max() > spec.classes - 1:
        raise ValueError(
            f"{spec.name}: expected labels in [0, {spec.classes - 1}], "
            f"got [{labels.min().item()}, {labels.max().item()}]"
        )
