"""Every ```python block of README.md and docs/*.md runs as written.

How blocks are run (the rules a page's author needs to know):

* The blocks of one page run in order, in one fresh Python process, in one
  shared namespace: a later block may use what an earlier block of the same
  page defined (``model``, ``ema``, ...), as a reader going down the page
  would.  Pages do not share anything.
* The process runs in an empty temporary directory (files a block writes,
  such as ``checkpoints/``, land there), on the CPU (``CUDA_VISIBLE_DEVICES``
  is emptied), with the repository on ``sys.path``.
* A block that cannot run here (it needs a GPU, several processes or a long
  run) is marked by an HTML comment on the line directly before its fence::

      <!-- docs-test: skip (needs torchrun: several processes) -->

  Its reason is mandatory and shows up in the test report as a skipped test
  (``pytest -rs``).  Skipped blocks still count as defined for the page's
  later blocks only if those blocks do not rely on them: keep them few.
* A block that needs a framework (Lightning, timm...) says so the same way::

      <!-- docs-test: needs lightning timm -->

  It runs when they import.  Where one does not, or with
  EMA_CUDA_SKIP_INTEGRATIONS=1 (the suites against an older torch, beside
  which the installed frameworks do not work), the block is left out of its
  page's run and reported; under ``make test`` (EMA_CUDA_EXPECT_INTEGRATIONS=1,
  everything installed) that is a failure instead.  Later blocks of the page
  must not rely on such a block unless they need the same packages.
* Failures name the page and the line in the Markdown file: each block is
  compiled with its own line numbers.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_MARK = "@@docs-test block"
_FENCE = re.compile(r"^```(\w*)\s*$")
_SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*(?:\((?P<reason>.*)\))?\s*-->\s*$")
_NEEDS = re.compile(r"^<!--\s*docs-test:\s*needs\s+(?P<packages>[\w .-]+?)\s*-->\s*$")


@dataclass
class Block:
    page: str  # relative to the repository
    line: int  # 1-based line of the first code line
    code: str
    skip: Optional[str]  # the reason, when marked
    needs: Tuple[str, ...] = ()  # packages the block imports beyond the project's own dependencies


def extract(path: Path, root: Path = ROOT) -> List[Block]:
    """The ```python blocks of a Markdown file, with their skip markers."""
    lines = path.read_text().splitlines()
    rel = str(path.relative_to(root))
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i + 1
        end = start
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if lang == "python":
            prev = lines[i - 1].strip() if i > 0 else ""
            marker = _SKIP.match(prev)
            skip = None
            if marker:
                skip = (marker.group("reason") or "").strip()
                if not skip:
                    raise AssertionError(f"{rel}:{i}: a docs-test skip marker needs a reason in parentheses")
            needs = _NEEDS.match(prev)
            blocks.append(Block(rel, start + 1, "\n".join(lines[start:end]) + "\n", skip,
                                tuple(needs.group("packages").split()) if needs else ()))
        i = end + 1
    return blocks


def _stray_markers(path: Path) -> List[int]:
    """Lines of skip markers that are not directly followed by a ```python fence."""
    lines = path.read_text().splitlines()
    return [
        n + 1
        for n, line in enumerate(lines)
        if (_SKIP.match(line.strip()) or _NEEDS.match(line.strip()))
        and not (n + 1 < len(lines) and lines[n + 1].startswith("```python"))
    ]


ALL = {str(p.relative_to(ROOT)): extract(p) for p in PAGES}
SKIPPED = [b for blocks in ALL.values() for b in blocks if b.skip]


def _runner_script(blocks: List[Block]) -> str:
    """A script that runs the blocks in order in one namespace, each compiled under its own page and line."""
    parts = [
        "import sys",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "ns = {'__name__': '__main__'}",
    ]
    for b in blocks:
        # Leading newlines make the line numbers of tracebacks those of the Markdown file.
        src = "\n" * (b.line - 1) + b.code
        parts += [
            f"print('{_MARK} {b.page}:{b.line}', flush=True)",
            f"exec(compile({src!r}, {b.page!r}, 'exec'), ns)",
        ]
    return "\n".join(parts) + "\n"


def test_every_page_has_runnable_blocks_and_well_placed_markers():
    # A parser that found nothing would make every test below pass vacuously.
    assert len([b for b in ALL["README.md"] if not b.skip]) >= 4
    assert len([b for b in ALL["docs/distributed.md"] if not b.skip]) >= 1
    assert len([b for b in ALL["docs/training.md"] if not b.skip]) >= 1
    for p in PAGES:
        assert _stray_markers(p) == [], f"{p.name}: skip markers not directly before a ```python fence"
    # Skips are the exception (today: the torchrun scripts of distributed.md);
    # raising this limit should take a reason.
    assert len(SKIPPED) <= 4, [f"{b.page}:{b.line} ({b.skip})" for b in SKIPPED]


def test_extract_reads_fences_and_markers(tmp_path):
    md = tmp_path / "page.md"
    md.write_text(textwrap.dedent("""\
        text
        ```python
        a = 1
        ```
        ```bash
        echo no
        ```
        <!-- docs-test: skip (needs a GPU) -->
        ```python
        b = 2
        ```
        <!-- docs-test: needs lightning timm -->
        ```python
        c = 3
        ```
        """))
    blocks = extract(md, root=tmp_path)
    assert [(b.line, b.code, b.skip, b.needs) for b in blocks] == [
        (3, "a = 1\n", None, ()), (10, "b = 2\n", "needs a GPU", ()), (14, "c = 3\n", None, ("lightning", "timm"))]


def test_a_block_whose_package_does_not_import_is_left_out_or_fails(monkeypatch):
    blocks = [Block("p.md", 1, "a = 1\n", None), Block("p.md", 5, "import nope\n", None, ("no_such_package_x",))]
    monkeypatch.delenv("EMA_CUDA_EXPECT_INTEGRATIONS", raising=False)
    monkeypatch.setenv("EMA_CUDA_SKIP_INTEGRATIONS", "1")  # the older-torch suites: off without trying
    with pytest.warns(UserWarning, match=r"left out: p.md:5 needs no_such_package_x \(EMA_CUDA_SKIP_INTEGRATIONS=1\)"):
        assert _runnable(blocks) == blocks[:1]
    monkeypatch.delenv("EMA_CUDA_SKIP_INTEGRATIONS")
    with pytest.warns(UserWarning, match=r"left out: p.md:5 needs no_such_package_x \(ModuleNotFoundError"):
        assert _runnable(blocks) == blocks[:1]
    monkeypatch.setenv("EMA_CUDA_EXPECT_INTEGRATIONS", "1")
    with pytest.raises(pytest.fail.Exception, match="make test` installs it"):
        _runnable(blocks)


@functools.lru_cache(maxsize=None)
def _import_error(package: str) -> Optional[str]:
    """Why ``package`` does not import in a fresh interpreter (None when it does)."""
    proc = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode])[-1]


def _runnable(blocks: List[Block]) -> List[Block]:
    """The blocks whose packages import; the others are reported (a failure under ``make test``)."""
    out = []
    off = os.environ.get("EMA_CUDA_SKIP_INTEGRATIONS") == "1"  # see tests/support.require_package
    for b in blocks:
        if off and b.needs:
            warnings.warn(f"left out: {b.page}:{b.line} needs {', '.join(b.needs)} (EMA_CUDA_SKIP_INTEGRATIONS=1)")
            continue
        missing = {p: _import_error(p) for p in b.needs}
        missing = {p: why for p, why in missing.items() if why is not None}
        if not missing:
            out.append(b)
            continue
        why = f"{b.page}:{b.line} needs {', '.join(f'{p} ({w})' for p, w in missing.items())}"
        if os.environ.get("EMA_CUDA_EXPECT_INTEGRATIONS") == "1":
            pytest.fail(why + "; `make test` installs it (INTEGRATIONS in the Makefile)", pytrace=False)
        warnings.warn(f"left out: {why}")
    return out


@pytest.mark.parametrize("page", [p for p, blocks in ALL.items() if any(not b.skip for b in blocks)])
def test_page_blocks_run(page, tmp_path):
    blocks = _runnable([b for b in ALL[page] if not b.skip])
    if not blocks:
        pytest.skip(f"{page}: every block needs a package that does not import here")
    script = tmp_path / "run_blocks.py"
    script.write_text(_runner_script(blocks))
    work = tmp_path / "cwd"
    work.mkdir()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{page} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    # Every block ran (a block that ended the process early would skip the rest).
    assert proc.stdout.count(_MARK) == len(blocks), proc.stdout[-2000:]


@pytest.mark.parametrize("block", SKIPPED, ids=[f"{b.page}:{b.line}" for b in SKIPPED])
def test_skipped_block(block):
    pytest.skip(f"{block.page}:{block.line}: {block.skip}")
