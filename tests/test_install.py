"""Packaging and installation: what a wheel contains, what the build records, and
what a user is told when the compiled extension cannot be used.

The import-failure cases run in a subprocess against a copy of the package in a
temporary directory, so that the test process keeps its own backend: a copy with
no ``_C`` library is a source checkout that was never built; a copy with an
unloadable ``_C`` and a ``_build_info.py`` naming another torch is what pip's
default build isolation leaves behind.
"""
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

import ema_cuda

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(ema_cuda.__file__).resolve().parent


def _pyproject():
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _load_setup_py():
    """setup.py as a module (its build runs only under ``__main__``)."""
    spec = importlib.util.spec_from_file_location("ema_cuda_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ what a wheel contains


def test_package_discovery_covers_every_subpackage():
    # A hard-coded `packages = ["ema_cuda"]` left ema_cuda.training out of the
    # wheel: `from ema_cuda import Trainer` failed outside a source checkout.
    from setuptools import find_packages

    on_disk = {
        ".".join(p.relative_to(REPO).parts[:-1])
        for p in (REPO / "ema_cuda").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert "ema_cuda.training" in on_disk
    setuptools_cfg = _pyproject()["tool"]["setuptools"]
    packages = setuptools_cfg.get("packages", {"find": {}})
    if isinstance(packages, list):
        listed = set(packages)
    else:
        find = packages["find"]
        listed = set(
            find_packages(
                where=str(REPO / find.get("where", ["."])[0]),
                include=find.get("include", ("*",)),
                exclude=find.get("exclude", ()),
            )
        )
    assert on_disk <= listed, f"packages missing from the wheel: {sorted(on_disk - listed)}"
    assert not {p for p in listed if p.split(".")[0] in ("tests", "benchmarks", "examples", "tools")}


def test_license_is_an_spdx_expression():
    project = _pyproject()["project"]
    assert project["license"] == "BSD-3-Clause"
    requires = _pyproject()["build-system"]["requires"]
    setuptools_req = next(r for r in requires if r.startswith("setuptools"))
    # The SPDX string form of `license` needs setuptools >= 77.
    assert int(re.search(r">=\s*(\d+)", setuptools_req).group(1)) >= 77


def test_claimed_torch_minimum_is_the_one_ci_tests():
    # pyproject's `torch>=X.Y` is only honest if CI runs the suites against X.Y.
    deps = _pyproject()["project"]["dependencies"]
    claimed = re.fullmatch(r"torch>=(\d+\.\d+)", next(d for d in deps if d.startswith("torch"))).group(1)
    ci = (REPO / ".ci" / "run").read_text()
    tested = re.search(r"test-torch TORCH_VERSION=(\d+\.\d+)\.\d+", ci)
    assert tested, ".ci/run does not run `make test-torch` against the oldest supported torch"
    assert tested.group(1) == claimed
    build_requires = _pyproject()["build-system"]["requires"]
    assert f"torch>={claimed}" in build_requires


def test_every_csrc_source_is_compiled_in_some_build():
    # A file left out of setup.py's lists is compiled by no build, and nothing
    # else would say so: its ops would just be missing (a TORCH_LIBRARY_IMPL
    # that is never compiled is no link error).
    setup = _load_setup_py()
    on_disk = sorted(p.relative_to(REPO / "csrc").as_posix() for p in (REPO / "csrc").rglob("*") if p.suffix in (".cpp", ".cu"))
    listed = setup.SOURCES + setup.CUDA_SOURCES + setup.NO_CUDA_SOURCES
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)


# ------------------------------------------------------------------ what the build records


def test_default_arch_list_embeds_ptx_of_the_newest_architecture():
    # Without PTX, a GPU newer than every listed architecture has no kernel to run.
    setup = _load_setup_py()
    archs = setup.DEFAULT_CUDA_ARCH_LIST.split(";")
    newest = max(archs, key=lambda a: tuple(int(x) for x in a.split("+")[0].split(".")))
    assert newest.endswith("+PTX"), setup.DEFAULT_CUDA_ARCH_LIST
    assert "DEFAULT_CUDA_ARCH_LIST" in setup.__doc__ or setup.DEFAULT_CUDA_ARCH_LIST in setup.__doc__
    assert setup.DEFAULT_CUDA_ARCH_LIST in (REPO / "README.md").read_text()


@pytest.mark.skipif(ema_cuda.ops.backend() != "compiled", reason="a message of the compiled library")
def test_no_kernel_image_error_names_the_gpu_the_build_and_the_fix():
    """A launch on a GPU the build has no code for fails with this message (csrc/cuda: check_launch).  The
    launch itself needs such a GPU; the message is host code, checked here on any machine."""
    msg = torch.ops.ema_cuda_testing.no_kernel_image_message(1, 8, 6)
    assert msg.startswith("ema_cuda::ema_update_: this build of ema_cuda has no kernel for cuda:1 "
                          "(compute capability 8.6)"), msg
    assert 'Rebuild for this GPU: TORCH_CUDA_ARCH_LIST="8.6" pip install --no-build-isolation' in msg
    if ema_cuda.ops.cuda_kernel_available():
        # setup.py records the architectures it compiled: "8.0;9.0+PTX" as "8.0,9.0+PTX".
        built = re.search(r"it was compiled for TORCH_CUDA_ARCH_LIST=([0-9A-Za-z.+,]+)\. ", msg)
        assert built, msg
        requested = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if requested and os.environ.get("EMA_CUDA_EXPECT_INTEGRATIONS") == "1":  # `make test`: built with it
            assert built.group(1) == ",".join(requested.replace(";", " ").replace(",", " ").split())
    else:
        assert "an unrecorded TORCH_CUDA_ARCH_LIST" in msg


def test_build_info_records_the_torch_built_against(tmp_path):
    setup = _load_setup_py()
    path = tmp_path / "_build_info.py"
    setup.write_build_info(str(path))
    namespace = {}
    exec(path.read_text(), namespace)
    assert namespace["TORCH_VERSION"] == torch.__version__
    assert namespace["TORCH_CUDA"] == torch.version.cuda


def test_build_info_is_not_tracked():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "ema_cuda/_build_info.py"])
    assert ignored.returncode == 0, "ema_cuda/_build_info.py is generated by setup.py and must be git-ignored"


# ------------------------------------------------------------------ why the fallback is in use


def _copy_package(root: Path, *, source_checkout: bool) -> Path:
    """The pure-Python part of ema_cuda under ``root``: no compiled library, no build info."""
    shutil.copytree(
        PACKAGE,
        root / "ema_cuda",
        ignore=shutil.ignore_patterns("__pycache__", "_C.*", "_build_info.py"),
    )
    if source_checkout:
        (root / "setup.py").write_text("# stands for the project's setup.py\n")
    return root / "ema_cuda"


def _import_in_subprocess(root: Path, backend: str = "auto"):
    """Imports the copy under ``root`` in a fresh interpreter; returns (returncode, fallback reason, stderr)."""
    # An editable install (`pip install -e .`) adds a finder that maps ema_cuda's
    # modules, _C included, to its own tree whatever sys.path says: set it
    # aside so that only the copy is seen.
    code = textwrap.dedent(
        """
        import sys
        import warnings
        sys.meta_path[:] = [f for f in sys.meta_path if not f.__module__.startswith("__editable__")]
        warnings.simplefilter("always")
        import ema_cuda
        assert ema_cuda.__file__.startswith(%r), ema_cuda.__file__
        print("REASON:", ema_cuda.ops.fallback_reason())
        """
        % str(root)
    )
    env = dict(os.environ, PYTHONPATH=str(root), EMA_CUDA_BACKEND=backend)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    reason = next((line[len("REASON: "):] for line in proc.stdout.splitlines() if line.startswith("REASON: ")), None)
    return proc.returncode, reason, proc.stderr


def _unloadable_library(package_dir: Path, built_against: str) -> None:
    """What an isolated build leaves: a library the running torch cannot load, and the torch it was built with."""
    (package_dir / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not a shared library")
    (package_dir / "_build_info.py").write_text(f'TORCH_VERSION = "{built_against}"\nTORCH_CUDA = None\n')


def test_unbuilt_source_checkout_says_the_extension_is_not_built(tmp_path):
    _copy_package(tmp_path, source_checkout=True)
    rc, reason, stderr = _import_in_subprocess(tmp_path)
    assert rc == 0, stderr
    assert "partially initialized" not in stderr
    assert "is not built" in reason
    assert "pip install --no-build-isolation -e ." in reason
    assert "pure-PyTorch fallback" in stderr and reason in stderr


def test_unbuilt_source_checkout_with_compiled_backend_required(tmp_path):
    _copy_package(tmp_path, source_checkout=True)
    rc, _, stderr = _import_in_subprocess(tmp_path, backend="compiled")
    assert rc != 0
    assert "EMA_CUDA_BACKEND=compiled" in stderr
    assert "is not built" in stderr
    assert "pip install --no-build-isolation -e ." in stderr
    assert "partially initialized" not in stderr


@pytest.mark.parametrize("source_checkout", [True, False], ids=["editable", "installed"])
def test_library_built_against_another_torch_says_so_and_how_to_fix_it(tmp_path, source_checkout):
    package_dir = _copy_package(tmp_path, source_checkout=source_checkout)
    _unloadable_library(package_dir, built_against="2.99.0+cu999")
    rc, reason, stderr = _import_in_subprocess(tmp_path)
    assert rc == 0, stderr
    assert f"built against torch 2.99.0+cu999, running torch {torch.__version__}" in reason
    assert "build isolation" in reason
    fix = "pip install --no-build-isolation -e ." if source_checkout else "pip install --no-build-isolation ."
    assert f"`{fix}`" in reason
    assert reason in stderr


def test_library_that_fails_to_load_with_the_same_torch_gives_the_loader_error(tmp_path):
    package_dir = _copy_package(tmp_path, source_checkout=False)
    _unloadable_library(package_dir, built_against=torch.__version__)
    rc, reason, stderr = _import_in_subprocess(tmp_path)
    assert rc == 0, stderr
    assert "could not be imported" in reason
    assert str(package_dir / "_C") in reason  # the loader's own message names the library
    assert "running torch" not in reason  # the versions agree: no claim that they differ
    assert "`pip install --no-build-isolation .`" in reason
