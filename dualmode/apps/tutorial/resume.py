"""`dualmode tutorial --checkpoint DIR`: save each mode's run every N steps and resume it when restarted.

Each mode keeps one file, DIR/<mode>.ckpt, written with `dm.save_checkpoint` (step, optimizer, schedule, RNG).
Its extra values hold where the run is (steps done), the losses and timings so far, and the settings that
shape the run; a restart with other settings is refused by name, not resumed into something else. The data
order is replayed: the loader is built from the same seed and the batches already trained are drawn and
skipped, so the resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import os

import dualmode as dm

# What may change between a run and its resume: how long it runs, how it compiles, where and how often it saves.
_MAY_CHANGE = ("epochs", "max_steps", "backend", "checkpoint", "checkpoint_every")


class ResumeError(ValueError):
    """The checkpoint in DIR belongs to another run (other settings, other data)."""


def checkpoint_path(folder: str, mode: str) -> str:
    return os.path.join(folder, f"{mode}.ckpt")


def run_settings(settings, data_name: str) -> dict:
    """The settings a resumed run must share with the run that saved, as plain values."""
    fields = {k: v for k, v in dataclasses.asdict(settings).items() if k not in _MAY_CHANGE}
    return {**fields, "data": data_name}


def save(path: str, step, result, steps_done: int, settings, data_name: str) -> None:
    dm.save_checkpoint(path, step, steps_done=steps_done, losses=list(result.losses),
                       step_seconds=list(result.step_seconds), batch_sizes=list(result.batch_sizes),
                       settings=run_settings(settings, data_name))


def resume(path: str, step, result, settings, data_name: str) -> int:
    """Load the run saved at `path` into `step` and `result`; return how many steps it had done (0 if no file).

    Raises ResumeError when the file belongs to another run; the caller then stops (the step was loaded).
    """
    if not os.path.exists(path):
        return 0
    try:
        extra = dm.load_checkpoint(path, step)
    except dm.CheckpointError as error:
        raise ResumeError(f"{error} (was {path} written by a run with other settings?)") from None
    saved, wanted = extra["settings"], run_settings(settings, data_name)
    differ = [f"{k} {saved.get(k)!r} (now {wanted.get(k)!r})" for k in sorted(set(saved) | set(wanted))
              if saved.get(k) != wanted.get(k)]
    if differ:
        raise ResumeError(f"{path} was written by a run with other settings: {', '.join(differ)}; use the same "
                          "options to resume it, or another --checkpoint folder")
    result.losses[:] = extra["losses"]
    result.step_seconds[:] = extra["step_seconds"]
    result.batch_sizes[:] = extra["batch_sizes"]
    return extra["steps_done"]
