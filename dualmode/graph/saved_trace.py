"""A traced step kept on disk for the next process (`config.trace_cache`): a warm first call without the trace.

Inductor's and AOTAutograd's caches make a later process's first call skip the compile, but not graph mode's
trace of build(): MobileNetV2's takes 3 to 5 s of a 6 to 7 s warm first call. With `config.trace_cache=True`
each traced step is saved in inductor's cache directory (`dualmode/traces/`), and a later process loads it
instead of tracing, when all of these are what they were:
- the cache key (shapes, dtypes, lr_scale, switches, config...), the step's class and name, its modules' names
  and classes, the optimizer's class, and the versions of torch, Python and dualmode (with a hash of dualmode's
  sources);
- every source file of the program that was imported (outside torch, the standard library and site-packages),
  and the file of every class and function described below, byte for byte;
- every attribute build() read from the step and its modules (guards.py), and every global that the program's
  code which can run in the step loads (its methods, its modules' methods, and what they lead to), described
  for another process by lasting.py.

Anything else differs and the step is traced again, saved anew, and `explain()` says what differed. What is not
compared: what the code reads from outside Python values (the environment, files) and through a library's own
globals, and attributes of modules reached by name (`settings.ALPHA`). A step that read a value lasting.py
cannot describe, fixes the batch size, or reduces gradients under DistributedDataParallel is not saved, and
`explain()` says why. The file is a pickle, read with `weights_only=False`: as inductor's own cache, the
directory must be one only you can write to.

The process that saves a trace loads it back as a later process would, fresh fake inputs included, and
compiles what it loaded (GraphModule's pickle regenerates the module from its code): every process hands
AOTAutograd the same graph and inputs, so its cache hits in the next one.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils._pytree import treespec_dumps, treespec_loads

import dualmode
from dualmode.graph import guards
from dualmode.graph.batch import BatchGuard
from dualmode.graph.lasting import Describer, NotLasting, dualmode_sources, file_hash, is_program_file
from dualmode.graph.trace import StepTracer
from dualmode.step.view import OWN_ATTRIBUTES

FORMAT = 1
TRACER_FIELDS = ("out_spec", "out_consts", "user_outputs", "input_grads", "finite_names")


@dataclass
class Traced:
    """A traced step: what trace.trace_step returns, its reads and batch conditions, and where it came from."""

    gm: torch.fx.GraphModule
    used: list[int]
    tracer: StepTracer
    batch_guard: BatchGuard
    source: str = ""  # for explain(): loaded, saved, or why neither


class TraceStore:
    """The saved traces of one cache directory."""

    def __init__(self, directory: str | None, problem: str = ""):
        self.directory = directory  # None: no cache directory (`problem` says why); nothing loaded or saved
        self.problem = problem

    @staticmethod
    def for_config(config) -> TraceStore | None:
        if not config.trace_cache:
            return None
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        try:
            return TraceStore(os.path.join(cache_dir(), "dualmode", "traces"))
        except OSError as error:  # cache_dir() creates the directory: a read-only file system, say
            return TraceStore(None, f"inductor's cache directory cannot be made ({error})")

    def load(self, call, parts: dict, slots: list, fakes: list) -> tuple[Traced | None, str]:
        """The saved trace of this call, checked against it; or None and why it was not used ("" if none)."""
        start = time.perf_counter()
        key = key_text(call, parts)
        path = self._path(key)
        if self.directory is None or not os.path.exists(path):
            return None, ""
        try:
            saved = torch.load(path, weights_only=False)
        except Exception as error:  # an unreadable or foreign file: traced again and written anew
            return None, f"the saved trace was not used: its file could not be read ({type(error).__name__}: {error})"
        try:
            stale = _stale(saved, call, key)
        except Exception as error:  # a file of another format, or a check that failed: said, never a crash
            stale = f"checking it failed ({type(error).__name__}: {error})"
        if stale is not None:
            return None, f"the saved trace was not used: {stale}"
        tracer = StepTracer(call, slots)
        for name in TRACER_FIELDS:
            setattr(tracer, name, saved["tracer"][name])
        tracer.out_spec = treespec_loads(tracer.out_spec)
        tracer.reads = _reads(saved["reads"], _objects(call))
        gm, used = saved["gm"], saved["used"]
        _set_examples(gm, [fakes[i] for i in used])
        batch_guard = BatchGuard.restored(saved["batch"])
        return Traced(gm, used, tracer, batch_guard,
                      f"loaded from a saved trace in {time.perf_counter() - start:.2f} s"), ""

    def save(self, call, parts: dict, traced: Traced) -> str | None:
        """Save a fresh trace; None when saved, else why not."""
        if self.directory is None:
            return self.problem
        try:
            saved = _contents(call, key_text(call, parts), traced)
        except NotLasting as why:
            return str(why)
        buffer = io.BytesIO()
        try:
            torch.save(saved, buffer)
        except Exception as error:  # something in the module or the batch conditions that pickle refuses
            part = next((k for k, v in saved.items() if not _pickles(v)), "?")
            return f"its {part} cannot be pickled ({type(error).__name__}: {error})"
        path = self._path(saved["key"])
        try:
            os.makedirs(self.directory, exist_ok=True)
            partial = f"{path}.{os.getpid()}.tmp"
            with open(partial, "wb") as f:
                f.write(buffer.getvalue())
            os.replace(partial, path)  # atomic: another process may load or write it at the same time
        except OSError as error:
            return f"{self.directory} cannot be written ({error})"
        return None

    def _path(self, key: str) -> str:
        return os.path.join(self.directory or "", hashlib.sha256(key.encode()).hexdigest()[:40] + ".pt")


def key_text(call, parts: dict) -> str:
    """Everything a saved trace must match exactly, as text (its hash names the file)."""
    objects = _objects(call)
    classes = tuple((label, _name(type(obj))) for label, obj in objects.items())
    optimizer = None if call.optimizer is None else _name(type(call.optimizer))
    return repr((FORMAT, torch.__version__, torch.version.git_version, sys.version, dualmode.__version__,
                 dualmode_sources(), call.step.name, classes, optimizer, tuple(parts.items())))


def _contents(call, key: str, traced: Traced) -> dict:
    tracer = traced.tracer
    if tracer.reducer is not None:
        raise NotLasting("a step with DistributedDataParallel modules is traced in every process")
    if traced.batch_guard.fixed:
        raise NotLasting("build() fixes the batch size")
    traced.gm.__dict__.pop("shape_env", None)  # make_fx's; the compile drops it too (compile.py)
    objects = _objects(call)
    labels, describer = _describer(call, objects)
    reads = []
    for obj, on_instance, looked_up in tracer.reads.by_object.values():
        if id(obj) not in labels:
            raise NotLasting(f"build() read attributes of a {type(obj).__name__} outside the step")
        reads.append((labels[id(obj)], sorted(on_instance), sorted(looked_up)))
    watched = _watched(tracer.reads, labels, describer)
    for obj in objects.values():
        describer.describe(obj, labels[id(obj)])  # their classes' methods, walked for globals
    if call.optimizer is not None:
        describer.describe(type(call.optimizer), "the optimizer's class")
    describer.walk()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if is_program_file(path):
            describer.files.setdefault(path, file_hash(path))
    values = {name: getattr(tracer, name) for name in TRACER_FIELDS}
    try:  # pytree's own text for the spec: a pickled leaf spec warns when loaded (torch 2.13)
        values["out_spec"] = treespec_dumps(tracer.out_spec)
        pickle.dumps(values)
    except Exception as error:
        raise NotLasting(f"build()'s outputs cannot be saved ({type(error).__name__}: {error})") from error
    return {"format": FORMAT, "key": key, "gm": traced.gm, "used": traced.used, "tracer": values, "reads": reads,
            "watched": watched, "globals": sorted(describer.globals.items()), "files": describer.files,
            "batch": traced.batch_guard.lasting()}


def _stale(saved: dict, call, key: str) -> str | None:
    """What differs between a saved trace and this call, or None."""
    if saved.get("format") != FORMAT or saved.get("key") != key:
        return "its key differs (another dualmode, torch or step)"
    for path, digest in saved["files"].items():
        if file_hash(path) != digest:
            return f"{path} changed"
    objects = _objects(call)
    labels, describer = _describer(call, objects)
    try:
        reads = _reads(saved["reads"], objects)
        now = _watched(reads, labels, describer)
        for (label, name, old), (_, _, new) in zip(saved["watched"], now):
            if old != new:
                return f"{label}.{name} differs"
        if len(now) != len(saved["watched"]):
            return "build() would read other attributes"
        for (module, name), old in saved["globals"]:
            namespace = getattr(sys.modules.get(module), "__dict__", {})
            new = describer.describe(namespace[name], f"the global {module}.{name}") if name in namespace else None
            if new != old:
                return f"the global {module}.{name} differs"
    except (NotLasting, KeyError) as why:
        return str(why)
    return None


def _watched(reads, labels: dict, describer: Describer) -> list[tuple]:
    """(label, attribute, description) of every attribute the guard built from `reads` watches."""
    guard = guards.Guard.from_reads(reads, labels, OWN_ATTRIBUTES)
    return [(w.label, w.name, ("absent",) if w.absent else describer.describe(w.ref, f"{w.label}.{w.name}"))
            for w in guard.watches]


def _reads(saved: list, objects: dict):
    reads = guards.Reads()
    for label, on_instance, looked_up in saved:
        if label not in objects:
            raise KeyError(f"the step has no {label}")
        obj = objects[label]
        reads.by_object[id(obj)] = (obj, set(on_instance), set(looked_up))
    return reads


def _objects(call) -> dict:
    """{label: object} of the step and every module reached from it, as guards.module_labels names them."""
    owner = call.step.owner
    found = {id(owner): owner}
    for _, module in call.modules:
        for sub in module.modules():
            found.setdefault(id(sub), sub)
    labels = guards.module_labels(owner, call.step.name, call.modules)
    return {labels[i]: obj for i, obj in found.items() if i in labels}


def _describer(call, objects: dict) -> tuple[dict, Describer]:
    """{id: label} of the step's objects, and a Describer that names them and the step's parameters and buffers."""
    labels = {id(obj): label for label, obj in objects.items()}
    return labels, Describer(labels, {id(t): n for t, n in zip(call.tensors.tensors, call.tensors.names)})


def _set_examples(gm: torch.fx.GraphModule, examples: list) -> None:
    # The unpickled module has no node metadata; the compile reads its inputs' fake tensors from there.
    for node, example in zip([n for n in gm.graph.nodes if n.op == "placeholder"], examples):
        node.meta["val"] = example


def _pickles(value) -> bool:
    try:
        torch.save(value, io.BytesIO())
    except Exception:
        return False
    return True


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
