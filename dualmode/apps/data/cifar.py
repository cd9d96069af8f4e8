"""CIFAR-10 from the official python archive, read from a directory the user gives (never downloaded).

The archive ``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/`` with five training batches
(``data_batch_1`` .. ``data_batch_5``) and ``test_batch``: pickled dicts whose ``b'data'`` is a
uint8 array (10000, 3072), each row the red, green then blue 32x32 planes, and whose ``b'labels'``
is a list of class indices. Either the archive or the extracted folder may be given.
"""

import hashlib
import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from dualmode.apps.data.dataset import ImageDataset, normalize_

__all__ = ["ARCHIVE_MD5", "ARCHIVE_NAME", "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "FOLDER_NAME", "cifar10"]

ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
# md5 of each extracted batch, as published with the archive (torchvision checks the same values).
BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_BATCHES = ("test_batch",)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and standard deviation of the 50,000 training images, pixel values in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_WHERE_TO_GET_IT = (
    f"download {ARCHIVE_NAME} from https://www.cs.toronto.edu/~kriz/cifar.html on a machine with internet "
    "and put it (or the folder it extracts to, {folder}) in {dir}"
)


def cifar10(data_dir, train: bool = True, *, check_md5: bool = True) -> ImageDataset:
    """The CIFAR-10 training (50,000) or test (10,000) images, normalised, as float32 NCHW tensors.

    Args:
        data_dir: the directory holding ``cifar-10-python.tar.gz`` or its extracted
            ``cifar-10-batches-py/`` folder (the folder is preferred when both are there: no gunzip).
        train: the five training batches if true, else the test batch.
        check_md5: compare the archive (or each batch read from the folder) with the official md5.
            Turn off only for archives you made yourself: the batches are pickles.

    Returns:
        An :class:`ImageDataset` with images (N, 3, 32, 32) normalised by ``CIFAR10_MEAN`` and
        ``CIFAR10_STD``, and int64 labels in ``range(10)``.

    Raises:
        FileNotFoundError: neither the archive nor the folder is in ``data_dir``, or a batch is missing;
            the message says where to put the archive.
        ValueError: an md5 differs from the official one, or a file is not a CIFAR-10 batch.
    """
    data_dir = Path(data_dir).expanduser()
    batches = TRAIN_BATCHES if train else TEST_BATCHES
    folder, archive = data_dir / FOLDER_NAME, data_dir / ARCHIVE_NAME
    if folder.is_dir():
        source = folder
        raw = [_read_folder_batch(folder / name, check_md5) for name in batches]
    elif archive.is_file():
        source = archive
        raw = _read_archive_batches(archive, batches, check_md5)
    else:
        where = "does not exist" if not data_dir.is_dir() else f"has neither {ARCHIVE_NAME} nor {FOLDER_NAME}/"
        hint = _WHERE_TO_GET_IT.format(folder=FOLDER_NAME + "/", dir=data_dir)
        raise FileNotFoundError(f"CIFAR-10 not found: {data_dir} {where}; {hint}")

    pixels = np.concatenate([data for data, _ in raw])
    labels = np.concatenate([batch_labels for _, batch_labels in raw])
    # Rows are the R, G, B planes one after another, so a reshape gives NCHW without a copy.
    images = torch.from_numpy(pixels).view(-1, 3, 32, 32).float().div_(255.0)
    split = "train" if train else "test"
    return ImageDataset(
        normalize_(images, CIFAR10_MEAN, CIFAR10_STD),
        torch.from_numpy(labels).long(),
        CIFAR10_CLASSES,
        name=f"CIFAR-10 {split} ({len(labels)} images from {source})",
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_md5(path: Path, expected: str) -> None:
    found = _md5(path)
    if found != expected:
        raise ValueError(
            f"{path} is not the official CIFAR-10 file: its md5 is {found}, expected {expected}. "
            f"Download it again, or pass check_md5=False if you made it yourself."
        )


def _read_folder_batch(path: Path, check_md5: bool):
    if not path.is_file():
        hint = _WHERE_TO_GET_IT.format(folder=FOLDER_NAME + "/", dir=path.parent.parent)
        raise FileNotFoundError(f"CIFAR-10 batch missing: {path} does not exist; {hint}")
    if check_md5:
        _check_md5(path, BATCH_MD5[path.name])
    return _parse_batch(path.read_bytes(), str(path))


def _read_archive_batches(archive: Path, batches, check_md5: bool):
    if check_md5:
        _check_md5(archive, ARCHIVE_MD5)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            raw = []
            for name in batches:
                member = f"{FOLDER_NAME}/{name}"
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    f = None
                if f is None:
                    raise ValueError(f"{archive} is not a CIFAR-10 archive: it has no file {member}")
                raw.append(_parse_batch(f.read(), f"{archive}:{member}"))
            return raw
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{archive} is not a readable CIFAR-10 archive (corrupt or truncated?): {error}") from error


def _parse_batch(payload: bytes, where: str):
    """(uint8 pixels (N, 3072), int64 labels (N,)) from one pickled batch."""
    try:
        batch = _BatchUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except Exception as error:  # pickle raises many types for bad input; all mean "not a batch"
        raise ValueError(f"{where} is not a CIFAR-10 batch: unpickling failed: {error}") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{where} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels', got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where} is not a CIFAR-10 batch: b'data' is {data.dtype} {data.shape}, "
                         "expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError(f"{where} is not a CIFAR-10 batch: b'labels' must be {data.shape[0]} classes in 0..9")
    return data, labels


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, bytes, numpy arrays): no code runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # how the official files (numpy 1) name it
        ("numpy._core.multiarray", "_reconstruct"),  # how numpy 2 names it
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        return super().find_class(module, name)
