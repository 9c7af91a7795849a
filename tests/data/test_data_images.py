"""Image data sets: the digits split, and MNIST / CIFAR-10 read through torchvision from tiny
files written in the real on-disk formats."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import struct
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from iresnet.data import IMAGE_DATASETS, ImageSpec, load_images

# ---------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_dtypes_and_ranges():
    pytest.importorskip("sklearn")
    for train, n in [(True, 1500), (False, 297)]:
        images, labels = load_images("digits", train=train)
        assert images.shape == (n, 1, 8, 8) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert images.min() == 0 and images.max() == 16
        assert set(labels.tolist()) == set(range(10))


def test_digits_split_is_a_fixed_partition_of_all_1797_images():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    train, train_labels = load_images("digits", train=True)
    test, test_labels = load_images("digits", train=False)
    again, again_labels = load_images("digits", train=False)
    assert torch.equal(again, test) and torch.equal(again_labels, test_labels)

    # Rows of (64 pixels, label): train + test must be exactly the 1797 rows of load_digits,
    # as a multiset (a few digits images are duplicates, so compare sorted rows, not sets).
    def rows(images, labels):
        table = np.concatenate([images.reshape(len(images), -1).numpy().astype(np.int64), labels.numpy()[:, None]], 1)
        return table[np.lexsort(table.T[::-1])]

    bunch = sklearn_datasets.load_digits()
    everything = rows(torch.from_numpy(bunch.images.astype(np.uint8)), torch.from_numpy(bunch.target))
    split = rows(torch.cat([train, test]), torch.cat([train_labels, test_labels]))
    assert len(everything) == 1797
    np.testing.assert_array_equal(split, everything)

    # The documented rule, and a pinned fingerprint so that the split cannot drift unnoticed.
    order = np.random.RandomState(0).permutation(1797)
    np.testing.assert_array_equal(test.squeeze(1).numpy(), bunch.images[np.sort(order[1500:])])
    assert test_labels[:10].tolist() == [1, 3, 4, 5, 8, 5, 5, 0, 4, 2]
    assert test_labels.bincount(minlength=10).tolist() == DIGITS_TEST_LABEL_COUNTS
    assert hashlib.sha256(test.numpy().tobytes()).hexdigest()[:16] == DIGITS_TEST_SHA256_PREFIX


DIGITS_TEST_LABEL_COUNTS = [27, 25, 35, 28, 38, 25, 30, 31, 23, 35]
DIGITS_TEST_SHA256_PREFIX = "2f60fbb62fdff352"


# ---------------------------------------------------------------------------------------------
# MNIST: IDX files (Y. LeCun's format): a big-endian header, magic 0x00000803 = 2051 for
# images (unsigned bytes, 3 dimensions) then N, rows, cols; 0x00000801 = 2049 for labels then
# N; then the bytes, row-major.


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">iiii", 2051, n, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def fake_mnist(root: Path) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.RandomState(1)
    splits = {}
    for train, prefix, n in [(True, "train", 5), (False, "t10k", 3)]:
        images = rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
        images[0, 0, 0], images[0, 0, 1], images[0, 27, 0] = 255, 0, 7  # row-major: (row 27, col 0) = 7
        labels = rng.randint(0, 10, size=n).astype(np.uint8)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        splits[train] = images, labels
    return splits


def test_mnist_reads_idx_files_exactly(tmp_path):
    pytest.importorskip("torchvision")
    expected = fake_mnist(tmp_path)
    for train in (True, False):
        images, labels = load_images("mnist", tmp_path, train=train)
        want_images, want_labels = expected[train]
        assert images.dtype == torch.uint8 and images.shape == (len(want_images), 1, 28, 28)
        assert labels.dtype == torch.int64
        np.testing.assert_array_equal(images[:, 0].numpy(), want_images)
        np.testing.assert_array_equal(labels.numpy(), want_labels)
        if train:
            assert images[0, 0, 27, 0] == 7 and images[0, 0, 0, 0] == 255 and images[0, 0, 0, 1] == 0


def test_mnist3x32_is_the_i_resnet_code_layout(tmp_path):
    """The i-ResNet code's MNIST: 2 zero pixels around each digit, the channel three times."""
    pytest.importorskip("torchvision")
    expected = fake_mnist(tmp_path)
    for train in (True, False):
        images, labels = load_images("mnist3x32", tmp_path, train=train)
        want_images, want_labels = expected[train]
        assert images.dtype == torch.uint8 and images.shape == (len(want_images), 3, 32, 32)
        for channel in range(3):
            np.testing.assert_array_equal(images[:, channel, 2:30, 2:30].numpy(), want_images)
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert images[:, :, border].eq(0).all()
        np.testing.assert_array_equal(labels.numpy(), want_labels)
    assert IMAGE_DATASETS["mnist3x32"].event_size == 3072


def test_mnist_root_may_be_a_string_and_rejects_a_wrong_image_size(tmp_path):
    pytest.importorskip("torchvision")
    fake_mnist(tmp_path)
    images, _ = load_images("mnist", str(tmp_path), train=False)
    assert images.shape == (3, 1, 28, 28)
    write_idx_images(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(N, 1, 28, 28\)"):
        load_images("mnist", tmp_path, train=False)


@pytest.mark.parametrize(
    "file, content, problem",
    [
        ("train-images-idx3-ubyte", np.random.RandomState(0).bytes(4000), "not the IDX magic number 00 00 08 03"),
        ("train-labels-idx1-ubyte", b"", "the file is empty"),
        ("train-labels-idx1-ubyte", struct.pack(">iiii", 2051, 5, 28, 28), "not the IDX magic number 00 00 08 01"),
        ("train-images-idx3-ubyte", struct.pack(">iiii", 2051, 5, 28, 28) + bytes(99), "5 x 28 x 28 bytes of data"),
        ("train-images-idx3-ubyte", struct.pack(">ii", 2051, 5), "its header stops after 8 bytes"),
    ],
    ids=["random bytes", "empty", "images for labels", "cut short", "header cut short"],
)
def test_a_corrupted_mnist_file_is_named(tmp_path, file, content, problem):
    """Random bytes gave torchvision's bare AssertionError, an empty file "invalid literal for int()"."""
    pytest.importorskip("torchvision")
    fake_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / file
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem) as caught:
        load_images("mnist", tmp_path, train=True)
    assert f"{path} is not a valid MNIST file" in str(caught.value) and "download=True" in str(caught.value)
    load_images("mnist", tmp_path, train=False)  # the other split's files are sound


def test_the_command_line_names_a_corrupted_mnist_file(tmp_path, capsys):
    pytest.importorskip("torchvision")
    from iresnet.cli import main

    fake_mnist(tmp_path / "data")
    (tmp_path / "data" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "t10k-labels-idx1-ubyte is not a valid MNIST file (IDX format): the file is empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# CIFAR-10: the python version's batches are Python 2 pickles (protocol 2) of dicts whose keys
# are Python 2 str: "data" a uint8 numpy array (n, 3072), each row the 1024 red, then 1024
# green, then 1024 blue values of a 32 x 32 image in row-major order; "labels" a list of ints;
# also "batch_label" and "filenames". batches.meta holds "label_names". torchvision unpickles
# them with encoding="latin1" (keys come back as str); with encoding="bytes", as on the CIFAR
# web page, the keys come back as b"data", b"labels". Python 3's pickle cannot write Python 2
# str objects, so py2_pickle writes the opcodes itself.


def _py2_str(value: bytes) -> bytes:
    if len(value) < 256:
        return b"U" + bytes([len(value)]) + value  # SHORT_BINSTRING
    return b"T" + struct.pack("<i", len(value)) + value  # BINSTRING


def _py2_int(value: int) -> bytes:
    return b"K" + bytes([value]) if 0 <= value < 256 else b"J" + struct.pack("<i", value)  # BININT1 / BININT


def _py2_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _py2_uint8_array(array: np.ndarray) -> bytes:
    """numpy.core.multiarray._reconstruct(ndarray, (0,), 'b') then BUILD with the state
    (1, shape, dtype('u1'), False, raw bytes), as numpy 1.x under Python 2 wrote it."""
    dtype = b"cnumpy\ndtype\n" + _py2_tuple([_py2_str(b"u1"), _py2_int(0), _py2_int(1)]) + b"R"
    dtype += _py2_tuple([_py2_int(3), _py2_str(b"|"), b"N", b"N", b"N", _py2_int(-1), _py2_int(-1), _py2_int(0)])
    dtype += b"b"
    shape = _py2_tuple([_py2_int(s) for s in array.shape])
    state = _py2_tuple([_py2_int(1), shape, dtype, b"\x89", _py2_str(np.ascontiguousarray(array).tobytes())])
    empty = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_tuple([_py2_int(0)])
    return empty + _py2_str(b"b") + b"\x87R" + state + b"b"  # TUPLE3 REDUCE ... BUILD


def _py2_value(value) -> bytes:
    if isinstance(value, np.ndarray):
        return _py2_uint8_array(value)
    if isinstance(value, str):
        return _py2_str(value.encode("latin1"))
    if isinstance(value, int):
        return _py2_int(value)
    if isinstance(value, list):
        return b"](" + b"".join(_py2_value(item) for item in value) + b"e"  # EMPTY_LIST MARK ... APPENDS
    raise TypeError(type(value))


def py2_pickle(mapping: dict[str, object]) -> bytes:
    items = b"".join(_py2_str(key.encode("latin1")) + _py2_value(value) for key, value in mapping.items())
    return b"\x80\x02}(" + items + b"u."  # PROTO 2, EMPTY_DICT, MARK ... SETITEMS, STOP


CIFAR_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def fake_cifar(root: Path) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """Two images per training batch, three in the test batch; returns (N, 3, 32, 32) images
    and labels per split. Image 0 of data_batch_1 is pure red, image 1 pure blue."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(2)
    train_images, train_labels = [], []
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        images = rng.randint(0, 256, size=(n, 3, 32, 32)).astype(np.uint8)
        if name == "data_batch_1":
            images[0] = 0
            images[0, 0] = 255
            images[1] = 0
            images[1, 2] = 200
        labels = [int(label) for label in rng.randint(0, 10, size=n)]
        batch = {
            "batch_label": f"{name} of 6",
            "labels": labels,
            "data": images.reshape(n, 3072),  # channel-major rows, as in the real files
            "filenames": [f"image_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(py2_pickle(batch))
        if name == "test_batch":
            test = images, np.array(labels)
        else:
            train_images.append(images)
            train_labels.extend(labels)
    meta = {"num_cases_per_batch": 10000, "label_names": CIFAR_LABEL_NAMES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return {True: (np.concatenate(train_images), np.array(train_labels)), False: test}


def test_fake_cifar_files_have_the_documented_layout(tmp_path):
    expected = fake_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as file:
        as_bytes = pickle.load(file, encoding="bytes")
    assert set(as_bytes) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert as_bytes[b"data"].dtype == np.uint8 and as_bytes[b"data"].shape == (2, 3072)
    np.testing.assert_array_equal(as_bytes[b"data"], expected[True][0][:2].reshape(2, 3072))
    assert as_bytes[b"labels"] == expected[True][1][:2].tolist()


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """torchvision checks every CIFAR-10 file against the MD5 sum of the real data set, which
    tiny test files cannot match. Only the checksum is skipped: the files must still exist, and
    the loading itself is torchvision's own."""
    cifar = pytest.importorskip("torchvision.datasets.cifar")
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_cifar10_reads_pickled_batches_exactly(tmp_path, skip_cifar_md5):
    expected = fake_cifar(tmp_path)
    for train, n in [(True, 10), (False, 3)]:
        images, labels = load_images("cifar10", tmp_path, train=train)
        assert images.dtype == torch.uint8 and images.shape == (n, 3, 32, 32) and images.is_contiguous()
        assert labels.dtype == torch.int64
        np.testing.assert_array_equal(images.numpy(), expected[train][0])
        np.testing.assert_array_equal(labels.numpy(), expected[train][1])
    images, _ = load_images("cifar10", tmp_path, train=True)
    assert (images[0, 0] == 255).all() and (images[0, 1:] == 0).all()  # red stays in channel 0
    assert (images[1, 2] == 200).all() and (images[1, :2] == 0).all()  # blue in channel 2


def test_cifar10_checksum_failure_is_not_reported_as_missing(tmp_path):
    pytest.importorskip("torchvision")
    fake_cifar(tmp_path)  # every file present, none matches the real MD5 sums
    with pytest.raises(ValueError, match="MD5 sums differ from the published ones") as caught:
        load_images("cifar10", tmp_path)
    assert all(str(tmp_path / "cifar-10-batches-py" / file) in str(caught.value) for file in CIFAR_FILES)


def test_the_cifar10_file_that_fails_its_checksum_is_named(tmp_path, monkeypatch):
    cifar = pytest.importorskip("torchvision.datasets.cifar")
    utils = pytest.importorskip("torchvision.datasets.utils")
    fake_cifar(tmp_path)

    def check_integrity(fpath, md5=None):  # all but data_batch_3 pass, as a download cut short would leave them
        return os.path.isfile(fpath) and not fpath.endswith("data_batch_3")

    monkeypatch.setattr(cifar, "check_integrity", check_integrity)
    monkeypatch.setattr(utils, "check_integrity", check_integrity)
    with pytest.raises(ValueError, match="fetch CIFAR-10 again with download=True") as caught:
        load_images("cifar10", tmp_path, train=False)
    assert str(caught.value).startswith(f"{tmp_path / 'cifar-10-batches-py' / 'data_batch_3'}: not the files")


# ---------------------------------------------------------------------------------------------
# missing files, offline


MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


@pytest.mark.parametrize(
    "name, folder, files",
    [("mnist", ("MNIST", "raw"), MNIST_FILES), ("cifar10", ("cifar-10-batches-py",), CIFAR_FILES)],
)
def test_missing_files_name_the_folder_and_the_files(tmp_path, name, folder, files):
    pytest.importorskip("torchvision")
    for train in (True, False):
        with pytest.raises(FileNotFoundError) as caught:
            load_images(name, tmp_path, train=train)
        message = str(caught.value)
        assert str(tmp_path.joinpath(*folder)) in message
        assert all(file in message for file in files)
        assert "download=True" in message


def test_one_missing_mnist_file_is_named(tmp_path):
    pytest.importorskip("torchvision")
    fake_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="missing: t10k-labels-idx1-ubyte"):
        load_images("mnist", tmp_path, train=True)  # torchvision wants all four for either split


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_failed_download_raises_file_not_found(tmp_path, monkeypatch, name):
    pytest.importorskip("torchvision")
    import importlib

    def offline(url, *args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    # Simulate being offline where torchvision fetches (MNIST tries each mirror in turn).
    module = importlib.import_module(f"torchvision.datasets.{'mnist' if name == 'mnist' else 'cifar'}")
    monkeypatch.setattr(module, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match="download failed") as caught:
        load_images(name, tmp_path, download=True)
    assert "Name or service not known" in str(caught.value)


def test_default_root_is_the_user_cache(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.setenv("HOME", str(tmp_path))
    searched = tmp_path / ".cache" / "iresnet" / "data" / "MNIST" / "raw"
    with pytest.raises(FileNotFoundError, match=re.escape(str(searched))):
        load_images("mnist")


# ---------------------------------------------------------------------------------------------
# the table and the errors


def test_spec_table():
    assert set(IMAGE_DATASETS) == {"digits", "mnist", "mnist3x32", "cifar10", "patches16", "patches32", "faces"}
    assert IMAGE_DATASETS["mnist"] == ImageSpec("mnist", (1, 28, 28), 256, 10)
    assert IMAGE_DATASETS["mnist3x32"] == ImageSpec("mnist3x32", (3, 32, 32), 256, 10)
    assert IMAGE_DATASETS["faces"] == ImageSpec("faces", (1, 24, 24), 256, 2)
    assert [spec.event_size for spec in IMAGE_DATASETS.values()] == [64, 784, 3072, 3072, 768, 3072, 576]
    assert all(name == spec.name for name, spec in IMAGE_DATASETS.items())
    assert [spec.classes for spec in IMAGE_DATASETS.values()] == [10, 10, 10, 10, 1, 1, 2]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="digits, mnist, mnist3x32, cifar10"):
        load_images("svhn")


@pytest.mark.parametrize(
    "name, module, hint",
    [("digits", "sklearn.datasets", "pip install scikit-learn"), ("mnist", "torchvision", "pip install torchvision")],
)
def test_a_missing_optional_dependency_says_what_to_install(tmp_path, monkeypatch, name, module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=hint):
        load_images(name, tmp_path)


def test_cifar10_classifier_preset_trains_on_cifar_files(tmp_path, skip_cifar_md5):
    """The paper's classifier preset, shrunk, end to end on files in CIFAR-10's format: crops and
    flips, SGD with its milestones, and the test error in percent."""
    from iresnet.train import resolve_config, train

    fake_cifar(tmp_path / "data")
    small = {"model": {"blocks": [1, 1, 1], "hidden": [4, 4, 4]}, "batch_size": 4, "warmup_steps": 0}
    schedule = {"steps": 3, "lr_milestones": [2], "eval_every": 3, "out": str(tmp_path / "run")}
    config = resolve_config("cifar10-classifier-paper", None, [small, schedule, {"data_dir": str(tmp_path / "data")}])
    assert config.augment and config.optimizer == "sgd"
    result = train(config, progress=False)
    assert result.evaluation.n == 3 and any(
        result.evaluation.error_percent == pytest.approx(100 * k / 3) for k in range(4)
    )
    assert (tmp_path / "run/model.safetensors").exists()
