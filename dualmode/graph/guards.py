"""What a traced step read from Python, and a cheap check before each call that none of it has changed.

make_fx bakes into the graph every Python value the traced code reads: a loss weight `self.alpha`, `dropout.p`,
which module `model.act` is, the hooks a module has. It has no guards of its own (dynamo's are not in play),
so graph mode records, while it traces `build()`, which instance attributes of the step and of every nn.Module
were read (`recording` patches `__getattribute__` of nn.Module and TrainGraph for the length of the trace),
and keeps what each one held. Before every later call, `Guard.change()` reads those attributes again and
compares them with what the trace saw; the runner recompiles on a change, naming the attribute.
What is compared: a number, string or other immutable value by value; a module, function or other object by
identity (a plain object's own attributes one level deep as well); a list, tuple or dict (hooks, a
Sequential's children) item by item; a tensor by identity, shape, dtype, device and requires_grad.
"""

from __future__ import annotations

import contextlib
import enum
import types
from collections import OrderedDict
from itertools import repeat
from operator import is_, itemgetter

import torch
from torch import nn

_MISSING = object()  # an attribute that was not there
IMMUTABLE = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, enum.Enum, range)
_SKIP_MODULE = frozenset({"_parameters", "_buffers", "training", "__dict__", "__class__"})  # in the cache key
HOOK_DICTS = {
    "_forward_hooks": "forward hooks", "_forward_pre_hooks": "forward pre-hooks",
    "_backward_hooks": "backward hooks", "_backward_pre_hooks": "backward pre-hooks",
    "_forward_hooks_with_kwargs": "forward hooks", "_forward_hooks_always_called": "forward hooks",
    "_forward_pre_hooks_with_kwargs": "forward pre-hooks",
}


class _Same:
    """Compares equal only to the very same object (and keeps it alive, so its id is never reused)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    __hash__ = None


def fingerprint(value, depth: int = 2):
    """A value that compares equal exactly when `value` would make the trace compute the same thing."""
    if isinstance(value, IMMUTABLE):
        return value
    if isinstance(value, torch.Tensor):
        return (_Same(value), tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, (nn.Module, types.FunctionType, types.BuiltinFunctionType, type, types.ModuleType)):
        return _Same(value)
    if depth <= 0:
        return _Same(value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(fingerprint(v, depth - 1) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((k, fingerprint(v, depth - 1)) for k, v in value.items()))
    if isinstance(value, types.MethodType):
        return (_Same(value.__func__), _Same(value.__self__))
    own = getattr(value, "__dict__", None)
    if isinstance(own, dict):
        return (_Same(value), fingerprint(own, depth - 1))
    return _Same(value)


class Reads:
    """The attributes read during a trace: {id(obj): (obj, names found on the instance, names looked up)}."""

    def __init__(self):
        self.by_object: dict[int, tuple[object, set, set]] = {}

    def note(self, obj, name: str, on_instance: bool) -> None:
        entry = self.by_object.get(id(obj))
        if entry is None:
            entry = self.by_object[id(obj)] = (obj, set(), set())
        (entry[1] if on_instance else entry[2]).add(name)


@contextlib.contextmanager
def recording(classes: tuple[type, ...]):
    """For the length of the block, note every attribute read on instances of `classes` (nn.Module, TrainGraph).

    A name found in the instance's `__dict__` is watched for its value. A name found elsewhere (a method on the
    class, a submodule, parameter or buffer found through nn.Module.__getattr__, an absent attribute) is
    watched so that an instance attribute of that name appearing later (a replaced submodule, a patched
    `forward`) is seen.
    """
    reads = Reads()
    base_get = object.__getattribute__

    def getattribute(obj, name):
        try:
            value = base_get(obj, name)
        except AttributeError:
            if not name.startswith("__"):
                reads.note(obj, name, False)
            raise
        if name in base_get(obj, "__dict__"):
            reads.note(obj, name, True)
        elif not name.startswith("_"):
            reads.note(obj, name, False)
        return value

    saved = [(cls, cls.__dict__.get("__getattribute__", _MISSING)) for cls in classes]
    for cls, _ in saved:
        cls.__getattribute__ = getattribute
    try:
        yield reads
    finally:
        for cls, old in saved:
            if old is _MISSING:
                del cls.__getattribute__
            else:
                cls.__getattribute__ = old


class _Watch:
    """One attribute the trace read: the dict to read it from again, what it held, and how to compare it.

    kind "same": an immutable value, a module, a function or an absent attribute: the very same object means
    unchanged. "items": a dict of such values (hooks, a module's children): also compared item by item. "deep":
    anything else (a tensor, a list, a plain object): compared by `fingerprint`.
    """

    __slots__ = ("kind", "label", "name", "print", "ref", "store", "value")

    def __init__(self, label: str, name: str, store: dict):
        self.label, self.name, self.store = label, name, store
        self.ref = store.get(name, _MISSING)
        self.value = fingerprint(self.ref)
        self.print = _shown(self.ref)
        self.kind = _kind(self.ref)

    @property
    def absent(self) -> bool:
        """The attribute was not set when traced."""
        return self.ref is _MISSING


def _kind(value) -> str:
    if value is _MISSING or _by_identity(value):
        return "same"
    if type(value) in (dict, OrderedDict) and all(_by_identity(v) for v in value.values()):
        return "items"
    return "deep"


def _by_identity(value) -> bool:
    if isinstance(value, tuple):
        return all(isinstance(v, IMMUTABLE) for v in value)
    return isinstance(value, IMMUTABLE + (nn.Module, types.FunctionType, types.BuiltinFunctionType, type))


class Guard:
    """What one compiled variant read from Python; `change()` says what differs now, or None.

    The common case, nothing changed, is three passes in C over flat lists: every watched attribute read again
    (`dict.get`) and compared by identity with what the trace saw, the items of every watched dict compared
    with theirs, and the few other values fingerprinted.
    """

    def __init__(self, watches: list[_Watch]):
        self.watches = watches
        self._stores = [w.store for w in watches]
        self._names = [w.name for w in watches]
        self._refs = [w.ref for w in watches]
        self._dicts = [i for i, w in enumerate(watches) if w.kind == "items"]
        self._items = [tuple(watches[i].ref.items()) for i in self._dicts]
        self._noted_sizes()
        self._pick_dicts = (lambda now: [now[self._dicts[0]]]) if len(self._dicts) == 1 else (
            itemgetter(*self._dicts) if self._dicts else (lambda now: ()))
        self._deep = [i for i, w in enumerate(watches) if w.kind == "deep"]

    def _noted_sizes(self) -> None:
        # Most watched dicts are empty hook dicts: their sizes say all; the items of the others are compared.
        self._sizes = list(map(len, self._items))
        self._full = [k for k, items in enumerate(self._items) if items]

    @classmethod
    def from_reads(cls, reads: Reads, labels: dict[int, str], skip_on_owner: frozenset) -> Guard:
        watches = []
        for obj, on_instance, looked_up in reads.by_object.values():
            label = labels.get(id(obj)) or f"a {type(obj).__name__} outside the step"
            store = object.__getattribute__(obj, "__dict__")
            is_module = isinstance(obj, nn.Module)
            skip = _SKIP_MODULE if is_module else skip_on_owner
            children = store.get("_modules", {}) if is_module else {}
            for name in sorted(on_instance | looked_up):
                if name in skip or (is_module and _is_tensor_slot(store, name)):
                    continue
                # A submodule found through nn.Module.__getattr__ is read again from the module's children.
                watches.append(_Watch(label, name, children if name in children and name not in store else store))
        return cls(watches)

    def change(self) -> str | None:
        """A sentence naming the first watched attribute whose value differs from the traced one, or None."""
        now = list(map(dict.get, self._stores, self._names, repeat(_MISSING)))
        if not all(map(is_, now, self._refs)):
            for i, (new, ref) in enumerate(zip(now, self._refs)):
                if new is not ref:
                    watch = self.watches[i]
                    if fingerprint(new) != watch.value:
                        return _describe(watch, new)
                    self._refs[i] = new  # an equal value in a new object: the same from now on
                    if i in self._dicts:
                        self._items[self._dicts.index(i)] = tuple(new.items())
                        self._noted_sizes()
        picked = self._pick_dicts(now)
        if list(map(len, picked)) != self._sizes or any(tuple(picked[k].items()) != self._items[k]
                                                        for k in self._full):
            items = list(map(tuple, map(dict.items, picked)))
            i = next(i for i, a, b in zip(self._dicts, items, self._items) if a != b)
            return _describe(self.watches[i], now[i])
        for i in self._deep:
            if fingerprint(now[i]) != self.watches[i].value:
                return _describe(self.watches[i], now[i])
        return None


def _is_tensor_slot(store: dict, name: str) -> bool:
    # Parameters and buffers are inputs of the graph, checked by the cache key (StepTensors.signature).
    return name in store.get("_parameters", {}) or name in store.get("_buffers", {})


def _shown(value) -> str:
    if value is _MISSING:
        return "(not set)"
    if isinstance(value, dict):
        return f"{len(value)} entries"
    if isinstance(value, types.MethodType):
        return f"the method {value.__func__.__qualname__}"
    text = repr(value).strip().splitlines()[0] if not isinstance(value, torch.Tensor) else (
        f"a tensor of shape {tuple(value.shape)}")
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(watch: _Watch, new) -> str:
    if watch.name == "_modules" and isinstance(new, dict):  # a Sequential's or ModuleList's child replaced
        old = {k: v.obj if isinstance(v, _Same) else v for k, v in watch.value[1]}
        for key in list(old) + [k for k in new if k not in old]:
            if old.get(key, _MISSING) is not new.get(key, _MISSING):
                return (f"{watch.label}.{key} changed: {_shown(old.get(key, _MISSING))} -> "
                        f"{_shown(new.get(key, _MISSING))}")
    if watch.name in HOOK_DICTS:
        old_count, new_count = len(watch.value[1]), len(new)
        return f"{watch.label}: {HOOK_DICTS[watch.name]} changed ({old_count} -> {new_count} registered)"
    shown = _shown(new)
    if shown == watch.print:  # equal reprs: another object of the same kind (a new CrossEntropyLoss())
        shown = f"another {shown}"
    return f"{watch.label}.{watch.name} changed: {watch.print} -> {shown}"


def module_labels(owner, owner_name: str, modules: list[tuple[str, nn.Module]]) -> dict[int, str]:
    """{id: qualified name} of the step (its class name) and of every module reached from it."""
    labels = {id(owner): owner_name}
    for attr, module in modules:
        for name, sub in module.named_modules(remove_duplicate=True):
            labels.setdefault(id(sub), f"{attr}.{name}" if name else attr)
    return labels
