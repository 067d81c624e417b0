"""Build script for ema_cuda's compiled op.

Environment switches (all optional):

* ``EMA_CUDA_SPILLS_ARE_ERRORS=1``  fail the build when the CUDA kernel spills registers.
* ``EMA_CUDA_CPU_ONLY=1``  build the CPU kernel only, even when nvcc is found.
* ``FORCE_CUDA=1``         a CUDA build is required: a CPU-only torch or a
                           missing nvcc is an error instead of a fallback.
* ``TORCH_CUDA_ARCH_LIST`` GPU architectures to compile for (for example
                           ``"9.0"``); when unset and no GPU is visible,
                           ``DEFAULT_CUDA_ARCH_LIST`` (``"8.0;9.0+PTX"``) is
                           used: machine code for sm_80 and sm_90, plus PTX
                           of the newest, which the driver compiles at load
                           time for a newer GPU that no listed architecture
                           matches.
* ``EMA_CUDA_NO_AVX2=1``   do not compile the CPU kernel with AVX2/FMA/F16C
                           (for building on one x86 machine and running on an
                           older one).
* ``MAX_JOBS``             parallel compile jobs (ninja).

Install with ``pip install --no-build-isolation .`` (torch must already be
installed, as for any PyTorch extension built from source).  The library only
loads with the torch it was compiled against; pip's default build isolation
would compile against a freshly downloaded torch instead.  The torch version
used is recorded in the generated ``ema_cuda/_build_info.py`` (not tracked by
git, shipped in the wheel), so that a mismatch is reported as such on import.
"""
import os
import platform
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# The default when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible.  The
# newest architecture carries +PTX so that a newer GPU can still JIT the kernel.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
BUILD_INFO = os.path.join(HERE, "ema_cuda", "_build_info.py")
# Sources under csrc/: those of every build, then the CUDA kernel, or in a
# build without CUDA the stand-in that says so.
SOURCES = [
    "schema.cpp",
    "checks.cpp",
    "plan.cpp",
    "cpu/ema_update_cpu.cpp",
    "testing.cpp",
    "python_module.cpp",
]
CUDA_SOURCES = ["cuda/ema_update_cuda.cu"]
NO_CUDA_SOURCES = ["cuda/no_cuda.cpp"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _cpu_supports_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return all(f" {x}" in flags for x in ("avx2", "fma", "f16c"))


def _cuda_home(cpp_extension, torch_cuda: str):
    """A CUDA toolkit root with bin/nvcc and the cudart library to link.

    torch guesses the root from the nvcc on PATH; when that nvcc is a wrapper
    script (e.g. /usr/local/bin/nvcc), the guess has no libraries.  Candidates:
    $CUDA_HOME, torch's guess, /usr/local/cuda-<torch's CUDA>, /usr/local/cuda.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    if torch_cuda:
        candidates.append(f"/usr/local/cuda-{torch_cuda}")
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        has_nvcc = os.path.exists(os.path.join(root, "bin", "nvcc"))
        has_rt = any(os.path.exists(os.path.join(root, d, "libcudart.so")) for d in ("lib64", "lib"))
        if has_nvcc and has_rt:
            return root
    return None


def _arch_list_token(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST as a preprocessor token list: "8.0;9.0+PTX" -> "8.0,9.0+PTX"."""
    allowed = set("0123456789.+,abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    token = ",".join(arch_list.replace(";", " ").replace(",", " ").split())
    return "".join(c for c in token if c in allowed) or "auto"


def _extensions():
    import torch
    from torch.utils import cpp_extension

    force_cuda = _flag("FORCE_CUDA")
    cpu_only = _flag("EMA_CUDA_CPU_ONLY")
    if force_cuda and cpu_only:
        sys.exit("ema_cuda: FORCE_CUDA=1 and EMA_CUDA_CPU_ONLY=1 contradict each other")
    cuda_home = _cuda_home(cpp_extension, torch.version.cuda) if torch.version.cuda else None
    with_cuda = not cpu_only and cuda_home is not None
    if force_cuda and not with_cuda:
        reason = (
            "torch is a CPU-only build"
            if torch.version.cuda is None
            else "no CUDA toolkit with bin/nvcc and libcudart.so was found (set CUDA_HOME)"
        )
        sys.exit(f"ema_cuda: FORCE_CUDA=1 but the CUDA kernel cannot be built: {reason}")

    def _ptxas_flags():
        # The kernels are sized for 64 registers (2 blocks of 512 threads per
        # SM; the multi-EMA kernel 128, one block): a change that makes one
        # spill to local memory is reported, and fails the build with
        # EMA_CUDA_SPILLS_ARE_ERRORS=1 (the Makefile's test builds set it).
        flags = "--warn-on-spills" + (",--warning-as-error" if _flag("EMA_CUDA_SPILLS_ARE_ERRORS") else "")
        return "-Xptxas=" + flags

    cxx = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]
    if not _flag("EMA_CUDA_NO_AVX2") and _cpu_supports_avx2():
        # A private CPU_CAPABILITY namespace keeps our at::vec instantiations
        # apart from libtorch's own.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=ema_avx2"]
    def sources(names):
        return [os.path.join("csrc", *name.split("/")) for name in SOURCES + names]

    kwargs = dict(
        name="ema_cuda._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        # torch reads this module global when it compiles and links.
        cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        print(f"ema_cuda: building CPU + CUDA kernels (TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')}, CUDA_HOME={cuda_home})")
        return [
            cpp_extension.CUDAExtension(
                sources=sources(CUDA_SOURCES),
                # The architectures built, for the "no kernel image" error:
                # separators that survive a shell command line, turned back
                # into a string by the preprocessor.
                define_macros=[
                    ("EMA_CUDA_ARCH_LIST_RAW", _arch_list_token(os.environ.get("TORCH_CUDA_ARCH_LIST", "auto"))),
                ],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", _ptxas_flags()]},
                **kwargs,
            )
        ]
    print("ema_cuda: building the CPU kernel only")
    return [cpp_extension.CppExtension(sources=sources(NO_CUDA_SOURCES), extra_compile_args={"cxx": cxx}, **kwargs)]


def write_build_info(path: str = BUILD_INFO) -> None:
    """Records the torch this build compiles against, for ema_cuda.ops to compare at import."""
    import torch

    text = (
        "# Generated by setup.py at build time (not tracked by git): the torch release\n"
        "# ema_cuda._C was compiled against.  The library only loads with that release.\n"
        f"TORCH_VERSION = {str(torch.__version__)!r}\n"
        f"TORCH_CUDA = {torch.version.cuda!r}\n"
    )
    try:
        with open(path) as f:
            if f.read() == text:
                return  # unchanged: keep the file's timestamp
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def main():
    from torch.utils.cpp_extension import BuildExtension

    # Written before setup() so that build_py copies it into the wheel.
    write_build_info()
    setup(
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
