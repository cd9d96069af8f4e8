"""CIFAR-10 reader (on small archives made here, in the official format) and the built-in dataset."""

import hashlib
import io
import os
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dualmode.apps.data import ImageDataset, builtin_dataset, cifar10, load_dataset
from dualmode.apps.data.cifar import ARCHIVE_MD5, ARCHIVE_NAME, CIFAR10_MEAN, CIFAR10_STD, FOLDER_NAME

TRAIN_NAMES = [f"data_batch_{i}" for i in range(1, 6)]
PER_BATCH = 3


def _batch(seed, n=PER_BATCH, numpy1_names=True):
    """One pickled batch like the official ones: b'data' uint8 (n, 3072), b'labels' a list."""
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, size=n)]}
    payload = pickle.dumps(batch, protocol=2)
    if numpy1_names:  # the official files were written by numpy 1, which names the module this way
        payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return batch, payload


def _write_folder(root, batches):
    folder = root / FOLDER_NAME
    folder.mkdir(parents=True)
    for name, payload in batches.items():
        (folder / name).write_bytes(payload)
    return folder


def _write_archive(root, batches):
    path = root / ARCHIVE_NAME
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in batches.items():
            info = tarfile.TarInfo(f"{FOLDER_NAME}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def batches():
    """name -> (dict, pickled bytes) for the five training batches and the test batch."""
    return {name: _batch(seed) for seed, name in enumerate(TRAIN_NAMES + ["test_batch"])}


def _payloads(batches):
    return {name: payload for name, (_, payload) in batches.items()}


def _expected(batches, names):
    data = np.concatenate([batches[n][0][b"data"] for n in names])
    labels = np.concatenate([batches[n][0][b"labels"] for n in names])
    images = torch.from_numpy(data).float().view(-1, 3, 32, 32) / 255
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images - mean) / std, torch.from_numpy(labels)


@pytest.mark.parametrize("layout", ["folder", "archive"])
@pytest.mark.parametrize("train", [True, False])
def test_reads_batches_normalised(tmp_path, batches, layout, train):
    writer = _write_folder if layout == "folder" else _write_archive
    writer(tmp_path, _payloads(batches))
    data = cifar10(tmp_path, train=train, check_md5=False)
    names = TRAIN_NAMES if train else ["test_batch"]
    images, labels = _expected(batches, names)
    assert isinstance(data, ImageDataset) and len(data) == len(names) * PER_BATCH
    assert data.images.dtype == torch.float32 and data.images.shape == (len(data), 3, 32, 32)
    assert data.labels.dtype == torch.int64
    torch.testing.assert_close(data.images, images)
    assert torch.equal(data.labels, labels)
    assert data.classes[0] == "airplane" and len(data.classes) == 10
    assert ("train" if train else "test") in data.name


def test_rows_are_red_green_blue_planes(tmp_path):
    data = np.zeros((1, 3072), dtype=np.uint8)
    data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 255, 128, 0
    payload = pickle.dumps({b"data": data, b"labels": [7]}, protocol=2)
    _write_folder(tmp_path, {"test_batch": payload})
    image = cifar10(tmp_path, train=False, check_md5=False).images[0]
    for channel, value in enumerate((255, 128, 0)):
        expected = (value / 255 - CIFAR10_MEAN[channel]) / CIFAR10_STD[channel]
        torch.testing.assert_close(image[channel], torch.full((32, 32), expected))


def test_numpy2_pickles_read_too(tmp_path):
    _, payload = _batch(0, numpy1_names=False)
    _write_folder(tmp_path, {"test_batch": payload})
    assert len(cifar10(tmp_path, train=False, check_md5=False)) == PER_BATCH


def test_archive_md5_mismatch_names_path_and_both_md5s(tmp_path, batches):
    path = _write_archive(tmp_path, _payloads(batches))
    found = hashlib.md5(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError) as error:
        cifar10(tmp_path)
    message = str(error.value)
    assert str(path) in message and found in message and ARCHIVE_MD5 in message
    assert "check_md5=False" in message


def test_folder_batch_md5_mismatch(tmp_path, batches):
    folder = _write_folder(tmp_path, _payloads(batches))
    with pytest.raises(ValueError, match="c99cafc152244af753f735de768cd75f") as error:
        cifar10(tmp_path)
    assert str(folder / "data_batch_1") in str(error.value)


@pytest.mark.parametrize("make_dir", [False, True])
def test_missing_data_says_where_to_put_it(tmp_path, make_dir):
    where = tmp_path / "cifar"
    if make_dir:
        where.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        cifar10(where)
    message = str(error.value)
    assert str(where) in message and ARCHIVE_NAME in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message


def test_missing_batch_in_folder_is_named(tmp_path, batches):
    payloads = _payloads(batches)
    del payloads["data_batch_3"]
    folder = _write_folder(tmp_path, payloads)
    with pytest.raises(FileNotFoundError, match="data_batch_3") as error:
        cifar10(tmp_path, check_md5=False)
    assert str(folder) in str(error.value)
    assert len(cifar10(tmp_path, train=False, check_md5=False)) == PER_BATCH  # the test split is whole


def test_missing_batch_in_archive_is_named(tmp_path, batches):
    payloads = _payloads(batches)
    del payloads["test_batch"]
    path = _write_archive(tmp_path, payloads)
    with pytest.raises(ValueError, match=f"{FOLDER_NAME}/test_batch") as error:
        cifar10(tmp_path, train=False, check_md5=False)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_archive_is_named(tmp_path, batches, damage):
    path = _write_archive(tmp_path, _payloads(batches))
    content = path.read_bytes()
    path.write_bytes(os.urandom(4096) if damage == "garbage" else content[: len(content) // 2])
    with pytest.raises(ValueError, match="not a readable CIFAR-10 archive") as error:
        cifar10(tmp_path, check_md5=False)
    assert str(path) in str(error.value)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a pickle", "unpickling failed"),
        (pickle.dumps({b"pixels": 1}, protocol=2), "b'data' and b'labels'"),
        (pickle.dumps([1, 2], protocol=2), "b'data' and b'labels'"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, protocol=2), "uint8"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2), "3072"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2), "labels"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, protocol=2), "labels"),
        (pickle.dumps(_RunsCode(), protocol=2), "refusing to load posix.system|refusing to load nt.system"),
    ],
)
def test_bad_batches_are_named(tmp_path, content, message):
    folder = _write_folder(tmp_path, {"test_batch": content})
    with pytest.raises(ValueError, match=message) as error:
        cifar10(tmp_path, train=False, check_md5=False)
    assert str(folder / "test_batch") in str(error.value)


def test_load_dataset_picks_the_source(tmp_path, batches):
    _write_folder(tmp_path, _payloads(batches))
    cifar = load_dataset(tmp_path, train=False, check_md5=False)
    assert cifar.name.startswith("CIFAR-10") and len(cifar) == PER_BATCH
    builtin = load_dataset(train=False)
    assert builtin.name.startswith("built-in digits")


def test_works_with_a_dataloader(tmp_path, batches):
    _write_archive(tmp_path, _payloads(batches))
    x, y = next(iter(DataLoader(cifar10(tmp_path, check_md5=False), batch_size=4, shuffle=True)))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)


# --- the built-in dataset -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return builtin_dataset(train=True), builtin_dataset(train=False)


def test_builtin_shapes_dtypes_and_classes(digits):
    for data, size in zip(digits, (1437, 360)):
        assert data.images.shape == (size, 3, 32, 32) and data.images.dtype == torch.float32
        assert data.labels.shape == (size,) and data.labels.dtype == torch.int64
        assert data.classes == tuple("0123456789")
        # Stratified: every class is in both splits in about its share.
        counts = torch.bincount(data.labels, minlength=10)
        assert counts.min() >= 0.09 * size


def test_builtin_is_normalised_with_train_statistics(digits):
    train, test = digits
    torch.testing.assert_close(train.images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(train.images.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    assert test.images.mean(dim=(0, 2, 3)).abs().max() < 0.1


def test_builtin_channels_differ(digits):
    images = digits[0].images
    assert not torch.allclose(images[:, 0], images[:, 1])


def test_builtin_split_is_deterministic(digits):
    again = builtin_dataset(train=False)
    assert torch.equal(again.images, digits[1].images) and torch.equal(again.labels, digits[1].labels)


def test_builtin_train_and_test_are_disjoint(digits):
    # Each image has its own random tint, so equal tensors would mean the same source image.
    train, test = ({bytes(image.numpy().tobytes()) for image in data.images} for data in digits)
    assert len(train) == 1437 and len(test) == 360
    assert train.isdisjoint(test)


def test_builtin_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'dualmode\[tutorial\]'"):
        builtin_dataset()


def test_image_dataset_rejects_bad_tensors():
    with pytest.raises(ValueError, match="float32"):
        ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.int64), "ab", "x")
    with pytest.raises(ValueError, match="int64"):
        ImageDataset(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.int64), "ab", "x")


def test_docstring_example_runs():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("dualmode.apps.data.load"))
    assert result.failed == 0 and result.attempted > 0
