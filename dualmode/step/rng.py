"""The random number generators a training step draws from: torch CPU and CUDA, Python `random`, NumPy.

Their states are kept as tensors, ints, lists and tuples only, so that `torch.load(weights_only=True)` reads
them back (NumPy's state array becomes a list of ints).
"""

from __future__ import annotations

import random
import warnings

import torch

from dualmode.step.state import CheckpointError

try:
    import numpy
except ImportError:  # NumPy is optional for this part
    numpy = None


def get_states() -> dict:
    """The current state of every generator (CUDA's only when CUDA was initialised, so none is started here)."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": None, "cuda": None}
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        states["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def check_states(states) -> None:
    """CheckpointError unless `states` is what get_states() gives."""
    if not isinstance(states, dict) or not {"torch", "python", "numpy", "cuda"} <= set(states):
        found = sorted(states) if isinstance(states, dict) else type(states).__name__
        raise CheckpointError(f"the random number generator states lack entries; found {found}")
    cpu = states["torch"]
    if not (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.shape == torch.get_rng_state().shape):
        raise CheckpointError("the torch CPU random number generator state is not a uint8 tensor of "
                              f"{torch.get_rng_state().numel()} bytes")
    python = states["python"]
    if not (isinstance(python, tuple) and len(python) == 3 and isinstance(python[1], (tuple, list))
            and len(python[1]) == len(random.getstate()[1])):
        raise CheckpointError("the Python random state is not a (version, internal state, gauss_next) tuple of "
                              "this Python's size")
    np_state = states["numpy"]
    if np_state is not None and not (isinstance(np_state, list) and len(np_state) == 5 and np_state[0] == "MT19937"
                                     and isinstance(np_state[1], list) and len(np_state[1]) == 624):
        raise CheckpointError("the NumPy random state is not [\"MT19937\", 624 keys, pos, has_gauss, cached]")
    cuda = states["cuda"]
    if cuda is not None and not (isinstance(cuda, list) and all(isinstance(t, torch.Tensor) for t in cuda)):
        raise CheckpointError("the CUDA random states are not a list of tensors")


def set_states(states: dict) -> None:
    """Set every generator to a state that check_states accepted.

    A checkpoint with CUDA states loaded where CUDA is missing, or with another number of devices, sets the
    others and warns that CUDA's random numbers will differ.
    """
    torch.set_rng_state(states["torch"])
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if states["numpy"] is not None:
        if numpy is None:
            warnings.warn("the checkpoint holds a NumPy random state, but NumPy is not installed: it is not set",
                          stacklevel=3)
        else:
            kind, keys, pos, has_gauss, cached = states["numpy"]
            numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))
    cuda = states["cuda"]
    if cuda is not None:
        devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if devices == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"the checkpoint holds random states of {len(cuda)} CUDA devices, this process has "
                          f"{devices}: they are not set, so CUDA random numbers (dropout on the GPU) will differ",
                          stacklevel=3)
