"""The package's shape: import cost, module size, and which folder may import which."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dualmode"


def test_import_dualmode_loads_neither_dynamo_nor_inductor():
    code = ("import sys, dualmode; heavy = ('torch._dynamo', 'torch._inductor'); "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith(heavy)}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_help_loads_neither_dynamo_nor_inductor():
    code = ("import sys\nfrom dualmode.apps.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted({m for m in sys.modules if m in ('torch._dynamo', 'torch._inductor')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "LOADED []" in out.stdout, out.stdout[-500:]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_300_lines(path):
    assert len(path.read_text().splitlines()) <= 300


def _imports(path: pathlib.Path) -> set[str]:
    """Modules imported at module level (not inside functions: those are the lazy imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


# folder -> dualmode folders it must not import at module level
FORBIDDEN = {
    "groups": ("dualmode.step", "dualmode.graph", "dualmode.apps"),
    "step": ("dualmode.graph.runner", "dualmode.graph.trace", "dualmode.graph.inputs", "dualmode.apps"),
    "graph": ("dualmode.apps",),
}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folders_import_only_downstream(folder):
    for path in (PACKAGE / folder).rglob("*.py"):
        bad = [m for m in _imports(path) if m.startswith(FORBIDDEN[folder])]
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_apps_use_only_the_public_api():
    for path in (PACKAGE / "apps").rglob("*.py"):
        private = [m for m in _imports(path) if m.startswith("dualmode.") and not m.startswith("dualmode.apps")]
        assert not private, f"{path.relative_to(PACKAGE)} imports {private}; apps use `import dualmode as dm`"
