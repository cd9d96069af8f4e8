"""Checkpoint files: `save_checkpoint(path, step, **extra)` and `load_checkpoint(path, step) -> extra`.

A file is one header line (JSON: format name and version, dualmode and torch versions, the payload's length and
sha256) followed by the payload, a `torch.save` of the step's state (state.py), the random number generators'
states, the mode and the caller's extra values. It is written to a temporary file in the same folder, fsynced,
renamed over `path` with `os.replace` and the folder fsynced: a crash leaves the previous file or the new one,
never a mix. Loading checks the header, the length and the checksum, reads the payload with
`torch.load(weights_only=True)`, checks everything against the step (state.check), and only then changes it.
See docs/checkpoints.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import torch

from dualmode._version import __version__
from dualmode.step import rng, state
from dualmode.step.state import CheckpointError

FORMAT = "dualmode-checkpoint"
VERSION = 1
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def save_checkpoint(path: str | os.PathLike, step, **extra) -> None:
    """Write everything `step` needs to continue exactly, and `extra` (plain values), atomically to `path`.

    Args:
        path: the file to write; its folder must exist. A previous file there is replaced only once the new
            one is complete on disk.
        step: a `dualmode.TrainGraph`, in either mode, at any point (inside an accumulation window too).
        **extra: values to keep with it (epoch, data position, metrics...): str, int, float, bool, None,
            tensors, and lists, tuples and dicts of those; `load_checkpoint` returns them.

    Under torch.distributed, rank 0 writes and every rank waits until the file is complete.

    Returns:
        None; the file holds the step's state, the random number generators' states and `extra`.

    Raises:
        CheckpointError: an `extra` value that `torch.load(weights_only=True)` could not read back (named).

    Example:
        >>> import os, tempfile, torch, dualmode as dm
        >>> class Step(dm.TrainGraph):
        ...     def __init__(self, model):
        ...         super().__init__(mode="eager")
        ...         self.model = model
        ...         self.add_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        ...     def build(self, x):
        ...         loss = self.model(x).square().mean()
        ...         loss.backward()
        ...         return loss
        >>> step = Step(torch.nn.Linear(3, 1))
        >>> _ = step(torch.ones(4, 3))
        >>> path = os.path.join(tempfile.mkdtemp(), "step.ckpt")
        >>> dm.save_checkpoint(path, step, epoch=3)
        >>> fresh = Step(torch.nn.Linear(3, 1))
        >>> dm.load_checkpoint(path, fresh)
        {'epoch': 3}
        >>> fresh.step_count
        1
    """
    for key, value in extra.items():
        _check_plain(value, f"extra value {key!r}")
    payload = {
        "state": state.build(step),
        "rng": rng.get_states(),
        "mode": step.mode,
        "step_class": type(step).__qualname__,
        "extra": extra,
    }
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        write_payload(path, buffer.getvalue())
    if distributed:
        torch.distributed.barrier()


def load_checkpoint(path: str | os.PathLike, step) -> dict:
    """Load a checkpoint of `save_checkpoint` into `step` (either mode) and return its extra values.

    Everything is checked first: a damaged file, a newer format or a state that does not fit the step raises
    `CheckpointError` naming what differs, and the step is left exactly as it was. The random number
    generators are set to their saved states; the step keeps its own mode.

    Args:
        path: a file written by `save_checkpoint`.
        step: the `dualmode.TrainGraph` to load into: the same modules, param groups, optimizer and scheduler
            kinds as the step that was saved (its mode may differ).

    Returns:
        The `extra` values given to `save_checkpoint`, as a dict.

    Raises:
        CheckpointError: the file is truncated, altered (checksum), of a newer format, or its state does not
            fit `step` (another group count, parameter name, shape, dtype, optimizer or scheduler kind).

    Example:
        >>> import os, tempfile, torch, dualmode as dm
        >>> class Step(dm.TrainGraph):
        ...     def __init__(self, model):
        ...         super().__init__(mode="eager")
        ...         self.model = model
        ...         self.add_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        ...     def build(self, x):
        ...         loss = self.model(x).square().mean()
        ...         loss.backward()
        ...         return loss
        >>> step = Step(torch.nn.Linear(3, 1))
        >>> _ = step(torch.ones(4, 3))
        >>> path = os.path.join(tempfile.mkdtemp(), "step.ckpt")
        >>> dm.save_checkpoint(path, step, epoch=3)
        >>> other = Step(torch.nn.Linear(5, 1))
        >>> try:
        ...     dm.load_checkpoint(path, other)
        ... except dm.CheckpointError as error:
        ...     print("refused:", "shape" in str(error))
        refused: True
        >>> other.step_count
        0
    """
    payload = read_payload(path)
    where = os.fspath(path)
    try:
        # To the CPU first: a checkpoint from a GPU machine loads on a CPU one; load_state_dict moves each tensor.
        saved = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{where}: the payload cannot be read ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''})") from error
    if not isinstance(saved, dict) or not {"state", "rng", "mode", "extra"} <= set(saved):
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{where}: the payload lacks entries; it holds {found}")
    try:
        state.check(step, saved["state"])
        rng.check_states(saved["rng"])
    except CheckpointError as error:
        raise CheckpointError(f"{where}: {error}") from None
    state.load(step, saved["state"])
    rng.set_states(saved["rng"])
    return saved["extra"]


def _check_plain(value, where: str) -> None:
    """TypeError naming `where` unless `value` is something `torch.load(weights_only=True)` reads back."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"a key of {where}")
            _check_plain(item, f"{where}[{key!r}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__}; extra values must be str, int, "
                        "float, bool, None, tensors, or lists, tuples and dicts of those (what "
                        "torch.load(weights_only=True) reads back)")


# The file -----------------------------------------------------------------------------------------------------

def write_payload(path: str | os.PathLike, payload: bytes, *, version: int = VERSION) -> None:
    """Write the header and `payload` to `path` atomically: temporary file, fsync, os.replace, fsync the folder."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    header = {"format": FORMAT, "version": version, "dualmode": __version__, "torch": torch.__version__,
              "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    temporary = os.path.join(folder, f".{name}.tmp")  # one fixed name: a crash's leftover is overwritten next time
    try:
        with open(temporary, "wb") as file:
            file.write(json.dumps(header).encode() + b"\n")
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the rename itself reaches the disk
    finally:
        os.close(descriptor)


def read_header(path: str | os.PathLike) -> dict:
    """The header of a checkpoint file (format, versions, payload length and checksum); CheckpointError if none."""
    with open(path, "rb") as file:
        return _parse_header(file.readline(4096), os.fspath(path))


def read_payload(path: str | os.PathLike) -> bytes:
    """The payload of a checkpoint file, after checking its header, its length and its sha256."""
    where = os.fspath(path)
    with open(path, "rb") as file:
        header = _parse_header(file.readline(4096), where)
        payload = file.read()
    if len(payload) != header["bytes"]:
        raise CheckpointError(f"{where}: the file is {'truncated' if len(payload) < header['bytes'] else 'too long'}"
                              f": {len(payload)} bytes of payload, the header says {header['bytes']}")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header["sha256"]:
        raise CheckpointError(f"{where}: the checksum does not match (sha256 {digest[:16]}..., the header says "
                              f"{str(header['sha256'])[:16]}...): the file was altered after it was written")
    return payload


def _parse_header(line: bytes, where: str) -> dict:
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a dualmode checkpoint (no '{FORMAT}' header line); write one "
                              "with dualmode.save_checkpoint")
    version = header.get("version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}: the header's format version is {version!r}, not a version number")
    if version > VERSION:
        raise CheckpointError(f"{where} has format version {version} (written by dualmode "
                              f"{header.get('dualmode')}); this dualmode ({__version__}) reads up to version "
                              f"{VERSION}: upgrade dualmode to load it")
    if not isinstance(header.get("bytes"), int) or not isinstance(header.get("sha256"), str):
        raise CheckpointError(f"{where}: the header lacks the payload's length or checksum")
    return header
