"""Every ```python block of README.md and docs/*.md runs, page by page, as written.

The blocks of one page run in order in one namespace, so a page may build on its earlier blocks; nothing is
shared between pages. A block of `>>>` lines is a doctest (its printed output is checked); any other block is
executed as a script. A block that must not run here is preceded by the comment
`<!-- docs-test: skip (reason) -->`; SKIPPED below lists each one, so that adding a skip is a visible change.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

# (page, first line of the block) -> why it does not run in this test.
SKIPPED = {
    ("README.md", 24): "compiles with inductor (tens of seconds); tests/test_readme.py runs it, marked inductor",
    ("docs/distributed.md", 37): "needs torchrun's environment; tests/distributed/test_docs.py runs it as one rank",
}

FENCE = re.compile(r"^(?:<!-- docs-test: skip \((?P<why>[^)]*)\) -->\n)?```(?P<lang>[^\n`]*)\n(?P<code>.*?)^```$",
                   re.MULTILINE | re.DOTALL)


def python_blocks(page: str) -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, code, skip reason or None) for each ```python block of `page`."""
    text = (ROOT / page).read_text()
    assert not re.search(r"^[ \t]+```python", text, re.MULTILINE), f"{page}: an indented ```python block would not run"
    blocks = []
    for m in FENCE.finditer(text):
        if m.group("lang").strip() == "python":
            line = text.count("\n", 0, m.start("lang")) + 1
            blocks.append((line, m.group("code"), m.group("why")))
    return blocks


def run_page(page: str) -> int:
    """Run every block of `page` that is not skipped; return how many ran."""
    namespace = {"__name__": "__docs__"}
    ran = 0
    for line, code, why in python_blocks(page):
        if why is not None:
            assert (page, line) in SKIPPED, f"{page}:{line} is marked skip but not listed in SKIPPED"
            continue
        where = f"{page}:{line}"
        if code.lstrip().startswith(">>>"):
            test = doctest.DocTestParser().get_doctest(code, namespace, where, str(ROOT / page), line)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
            result = runner.run(test, clear_globs=False)
            namespace.update(test.globs)  # the DocTest ran on a copy of the namespace
            assert result.failed == 0, f"{where}: {result.failed} of {result.attempted} doctest examples failed"
        else:
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 (running the docs is the point)
        ran += 1
    return ran


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page):
    run_page(page)


def test_block_count_and_skips():
    blocks = {page: python_blocks(page) for page in PAGES}
    skipped = {(page, line) for page, found in blocks.items() for line, _, why in found if why is not None}
    assert skipped == set(SKIPPED)
    executed = sum(len(found) for found in blocks.values()) - len(skipped)
    print(f"docs examples: {executed} blocks executed, {len(skipped)} skipped")
    assert executed >= 38
