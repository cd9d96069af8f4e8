"""Descriptions of Python values that mean the same in another process: what a saved trace is checked against.

In one process graph mode compares what build() read by identity (guards.py). A trace kept for a later process
(saved_trace.py) needs that comparison without identities:
- a module of the step by its name in the step, the step itself by its class;
- a function by its module, qualified name, code, defaults and closure; a class by its module and qualified
  name, and a class of the program's also by its methods' code; either one's source file by its content's hash;
- a parameter or buffer of the step by its name (it is an input of the graph), any other tensor by its shape,
  dtype, device, requires_grad and values;
- a number, string or other immutable value by value; a list, tuple or dict item by item; a plain object by its
  type and its attributes.

The functions and classes of the program (source files outside torch, the standard library and site-packages)
are read as well: every global name their code loads is described in turn (`Describer.globals`), so a module
constant or a command-line value that build() or a forward reads through a global is compared too. What cannot
be described this way raises `NotLasting` naming it; a step that read such a value is not saved.
"""

from __future__ import annotations

import dis
import enum
import functools
import hashlib
import os
import sys
import sysconfig
import types

import torch
from torch import nn

MAX_DEPTH = 4  # nesting of containers and objects described
MAX_ITEMS = 10_000  # items of one container
MAX_TENSOR_BYTES = 1 << 22  # a tensor that is not an input of the graph is described by its values, up to this

_LIBRARY_DIRS = tuple(os.path.realpath(p) + os.sep for p in {
    os.path.dirname(torch.__file__), sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
    sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
_TORCH_DIR = os.path.realpath(os.path.dirname(torch.__file__)) + os.sep
_DUALMODE_DIR = os.path.realpath(os.path.dirname(os.path.dirname(__file__))) + os.sep
_WRAPPERS = (staticmethod, classmethod, property, functools.partial)
_VALUES = (int, float, bool, str, bytes, complex, type(None), range, slice, type(Ellipsis))


class NotLasting(Exception):
    """A value build() read that has no meaning in another process (the message names it)."""


def file_hash(path: str, _seen: dict = {}) -> str:  # noqa: B006 (a cache, keyed by the file's stat)
    """sha256 of a file's content ("missing" if it cannot be read), cached while its size and mtime stay."""
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _seen:
        with open(path, "rb") as f:
            _seen[key] = hashlib.sha256(f.read()).hexdigest()
    return _seen[key]


def is_program_file(path: str | None) -> bool:
    """A source file of the user's program: not torch's, the standard library's, site-packages' or dualmode's."""
    if not path or not os.path.isabs(path):
        return False
    real = os.path.realpath(path)
    return not real.startswith(_LIBRARY_DIRS) and not real.startswith(_DUALMODE_DIR)


def dualmode_sources() -> str:
    """One hash of dualmode's own source files (an editable install changes them without a new version)."""
    digest = hashlib.sha256()
    for root, _, names in sorted(os.walk(_DUALMODE_DIR)):
        for name in sorted(n for n in names if n.endswith((".py", ".cpp"))):
            digest.update(f"{name}:{file_hash(os.path.join(root, name))};".encode())
    return digest.hexdigest()


class Describer:
    """Describes values for another process; collects the source files and program globals met on the way.

    `labels`: {id: name} of the step and its modules (guards.module_labels); `tensors`: {id: name} of the
    step's parameters and buffers.
    """

    def __init__(self, labels: dict[int, str], tensors: dict[int, str]):
        self.labels, self.tensors = labels, tensors
        self.files: dict[str, str] = {}  # source file -> hash of its content
        self.globals: dict[tuple[str, str], object] = {}  # (module, global name) -> its description
        self._walked: set[int] = set()
        self._pending: list[types.FunctionType] = []

    def describe(self, value, where: str, depth: int = 0):
        if isinstance(value, _VALUES):
            return value
        if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return ("torch", str(value))
        if isinstance(value, enum.Enum):
            return ("enum", self._class(type(value)), value.name)
        if id(value) in self.labels:  # its methods may run in the trace; its __init__ ran before it
            return ("step", self.labels[id(value)], self._class(type(value), with_init=False))
        if isinstance(value, torch.Tensor):
            return self._tensor(value, where)
        if isinstance(value, nn.Module):
            raise NotLasting(f"{where}: a {type(value).__name__} that is not one of the step's modules")
        if isinstance(value, types.FunctionType):
            return self._function(value, where, depth)
        if isinstance(value, types.MethodType):
            return ("method", self.describe(value.__func__, where, depth), self.describe(value.__self__, where, depth))
        if isinstance(value, type):
            return self._class(value)
        if isinstance(value, types.ModuleType):
            return ("module", value.__name__)
        if isinstance(value, (types.BuiltinFunctionType, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return ("builtin", getattr(value, "__module__", None), getattr(value, "__qualname__", str(value)))
        if depth >= MAX_DEPTH:
            raise NotLasting(f"{where}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, (tuple, list, set, frozenset, dict)):
            return self._container(value, where, depth)
        if isinstance(value, _WRAPPERS):
            parts = tuple(getattr(value, a, None) for a in ("__func__", "fget", "fset", "func", "args", "keywords"))
            return (type(value).__name__, self.describe(parts, where, depth + 1))
        own = getattr(value, "__dict__", None)
        if isinstance(own, dict) and not hasattr(type(value), "__slots__"):
            return ("object", self._class(type(value)), self.describe(own, where, depth + 1))
        raise NotLasting(f"{where}: a {type(value).__module__}.{type(value).__qualname__} value")

    def _tensor(self, t: torch.Tensor, where: str):
        if id(t) in self.tensors:
            return ("input", self.tensors[id(t)])
        if t.is_sparse or t.device.type == "meta" or t.numel() * t.element_size() > MAX_TENSOR_BYTES:
            raise NotLasting(f"{where}: a tensor of shape {tuple(t.shape)} that is not a parameter or buffer")
        values = hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return ("tensor", tuple(t.shape), str(t.dtype), str(t.device), t.requires_grad, values.hexdigest())

    def _container(self, value, where: str, depth: int):
        if len(value) > MAX_ITEMS:
            raise NotLasting(f"{where}: a {type(value).__name__} of {len(value)} items")
        if isinstance(value, dict):
            return (self._class(type(value)), tuple((self.describe(k, where, depth + 1),
                                                     self.describe(v, f"{where}[{k!r}]", depth + 1))
                                                    for k, v in value.items()))
        items = [self.describe(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, (set, frozenset)):
            items = sorted(items, key=repr)
        return (self._class(type(value)), tuple(items))

    def _class(self, cls: type, with_init: bool = True):
        """A class by name; the program's own also by the code of its methods, which are walked for globals."""
        file = _file_of_class(cls)
        self._note_file(file)
        if not (is_program_file(file) or (file is None and cls.__module__ == "__main__")):
            return ("class", cls.__module__, cls.__qualname__)
        methods = []
        for name, member in vars(cls).items():
            func = getattr(member, "__func__", getattr(member, "fget", member))
            if isinstance(func, types.FunctionType):
                methods.append((name, code_hash(func.__code__)))
                if (name != "__init__" or with_init) and id(func) not in self._walked:
                    self._pending.append(func)
        return ("class", cls.__module__, cls.__qualname__, tuple(methods))

    def _function(self, fn: types.FunctionType, where: str, depth: int):
        code = fn.__code__
        self._note_file(code.co_filename)
        if is_program_file(code.co_filename) or (fn.__module__ == "__main__" and not os.path.isabs(code.co_filename)):
            self._pending.append(fn)
        cells = tuple(self.describe(c.cell_contents, f"{where} (closure of {fn.__qualname__})", depth + 1)
                      if _filled(c) else "empty" for c in fn.__closure__ or ())
        return ("function", fn.__module__, fn.__qualname__, code_hash(code),
                self.describe(fn.__defaults__, where, depth + 1),
                self.describe(fn.__kwdefaults__, where, depth + 1), cells)

    def walk(self) -> None:
        """Describe every global the program's functions met so far load, and the functions those lead to."""
        while self._pending:
            fn = self._pending.pop()
            if id(fn) in self._walked:
                continue
            self._walked.add(id(fn))
            module = fn.__globals__.get("__name__", "?")
            for name in sorted(_global_names(fn.__code__)):
                if name in fn.__globals__ and (module, name) not in self.globals:
                    self.globals[(module, name)] = None  # while described: a cycle ends here
                    self.globals[(module, name)] = self.describe(fn.__globals__[name], f"the global {module}.{name}")

    def _note_file(self, path: str | None) -> None:
        if path and os.path.isabs(path) and not os.path.realpath(path).startswith((_TORCH_DIR, _DUALMODE_DIR)):
            self.files.setdefault(path, file_hash(path))


def code_hash(code: types.CodeType) -> str:
    """A hash of what a code object does: its bytecode, constants (nested code too) and names. (Not marshal's
    bytes, which depend on reference counts; not its line numbers.)"""
    digest = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        digest.update(_const_text(const).encode())
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars, code.co_flags,
                        code.co_argcount, code.co_kwonlyargcount, code.co_posonlyargcount)).encode())
    return digest.hexdigest()


def _const_text(const) -> str:
    if isinstance(const, types.CodeType):
        return code_hash(const)
    if isinstance(const, frozenset):  # `x in {"a", "b"}`: its order changes with the string hash seed
        return "frozenset" + repr(sorted(map(_const_text, const)))
    if isinstance(const, tuple):
        return "(" + ",".join(map(_const_text, const)) + ")"
    return repr(const)


def _global_names(code: types.CodeType) -> set[str]:
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _file_of_class(cls: type) -> str | None:
    return getattr(sys.modules.get(cls.__module__), "__file__", None)


def _filled(cell) -> bool:
    try:
        return cell.cell_contents is not _filled  # reading it raises for an empty cell
    except ValueError:
        return False
