"""Fast CPU BLAS for MLX on Linux, found and loaded automatically. Imports no framework.

MLX's Linux CPU wheel (`mlx[cpu]`) links a bundled reference BLAS (`libblas-<hash>.so`): an
unoptimized Fortran sgemm that runs a matmul at a few GFLOP/s. Debian/Ubuntu's OpenBLAS
(`libopenblas0-pthread`) exports the same `cblas_sgemm`, and the dynamic linker resolves a
library's undefined symbols in the *global* scope (the program and everything loaded with
RTLD_GLOBAL) before the library's own dependencies. So loading OpenBLAS with RTLD_GLOBAL before
`mlx.core` is imported makes MLX's matmuls run on OpenBLAS, in process: no LD_PRELOAD, no
re-exec, and it works the same under the CLI, pytest and a notebook (the gain:
docs/BENCHMARKS.md, "Figures behind the code"). The MLX backend calls `preload_openblas()` first
thing; `POLYGPT_NO_BLAS_FIX=1` opts out.

Side effect worth knowing: PyTorch's CPU wheel also exports `sgemm_`, and in a process where
OpenBLAS was made global *before torch's first matmul*, torch's sgemm resolves to OpenBLAS too
(numerically fine, slower than torch's MKL). `polygpt train/sample --backend torch` never loads
MLX, so only processes that use both frameworks (tests, cross-backend benchmarks) are affected;
benchmarks that compare speed should run torch first or each backend in its own process.

`blas_in_use()` reports which library provides `cblas_sgemm` in the global scope (via
`dladdr`), which is the one MLX binds to; "bundled reference BLAS (slow)" otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

OPT_OUT_ENV = "POLYGPT_NO_BLAS_FIX"
INSTALL_HINT = "sudo apt-get install libopenblas0-pthread (or run scripts/ensure_openblas.sh)"

# Debian/Ubuntu multiarch locations, pthread flavour first (MLX calls BLAS from its own
# threads; the pthread build is the one Debian's alternatives pick by default).
_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",  # Fedora / RHEL
    "/usr/lib/libopenblas.so.0",  # Arch
)

_loaded: str | None = None  # path of the OpenBLAS we made global, if any
_after_mlx = False  # True when mlx.core was imported before we loaded it (see blas_in_use)


def find_openblas() -> str | None:
    """Path of a system OpenBLAS shared library, or None (also None off Linux)."""
    if sys.platform != "linux":
        return None
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine()
    )
    for pattern in _CANDIDATES:
        p = Path(pattern.format(arch=arch))
        if p.exists():
            return str(p)
    return None


def preload_openblas() -> str | None:
    """Make a system OpenBLAS global before MLX loads; returns its path, or None when it is
    absent, not on Linux, or opted out with POLYGPT_NO_BLAS_FIX=1. Idempotent."""
    global _loaded, _after_mlx
    if _loaded is not None:
        return _loaded
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        return None
    path = find_openblas()
    if path is None:
        return None
    # OpenBLAS picks its kernels at load time from CPUID; in VMs that hide the CPU model
    # (e.g. "Intel(R) Xeon(R) Processor") it falls back to generic "Prescott" SSE3 kernels,
    # far slower than the AVX2/AVX-512 ones the CPU has (docs/BENCHMARKS.md, "Figures behind
    # the code"). Name the core from the CPU flags
    # for the load only (a user's own OPENBLAS_CORETYPE wins), then restore the environment.
    forced = None
    if "OPENBLAS_CORETYPE" not in os.environ:
        forced = coretype_from_cpu_flags()
        if forced:
            os.environ["OPENBLAS_CORETYPE"] = forced
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None  # a broken install must not break MLX: it just stays slow
    finally:
        if forced:
            del os.environ["OPENBLAS_CORETYPE"]
    _loaded = path
    _after_mlx = "mlx.core" in sys.modules
    return path


def coretype_from_cpu_flags(cpuinfo: str | None = None) -> str | None:
    """The OpenBLAS core name for this x86-64 CPU's vector extensions (None elsewhere)."""
    if platform.machine().lower() not in ("x86_64", "amd64") and cpuinfo is None:
        return None
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    if "avx" in flags:
        return "Sandybridge"
    return None


def openblas_core() -> str | None:
    """The kernel family the loaded OpenBLAS runs (e.g. "SkylakeX", "Haswell", "Prescott")."""
    if _loaded is None:
        return None
    try:
        fn = ctypes.CDLL(_loaded).openblas_get_corename
        fn.restype = ctypes.c_char_p
        return fn().decode()
    except (AttributeError, OSError):
        return None


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def global_symbol_library(symbol: str) -> str | None:
    """The file that provides `symbol` in the process's global scope, or None."""
    if sys.platform != "linux":
        return None
    try:
        addr = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        dladdr = libc.dladdr
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        info = _DlInfo()
        if not addr or not dladdr(addr, ctypes.byref(info)) or not info.dli_fname:
            return None
        return info.dli_fname.decode(errors="replace")
    except (AttributeError, OSError):
        return None


def openblas_threads() -> int | None:
    """OpenBLAS's thread count, when the library we loaded exposes it."""
    if _loaded is None:
        return None
    try:
        return int(ctypes.CDLL(_loaded).openblas_get_num_threads())
    except (AttributeError, OSError):
        return None


def blas_in_use() -> str:
    """One human line: which BLAS MLX's matmuls run on in this process (Linux CPU)."""
    lib = global_symbol_library("cblas_sgemm")
    if lib is not None:
        name = Path(lib).name
        if "openblas" in name.lower():
            core = openblas_core()
            if core:
                lib = f"{core} kernels, {lib}"
            if _after_mlx:  # MLX binds BLAS lazily, at its first matmul: it may predate us
                return f"OpenBLAS ({lib}; loaded after mlx.core, used if no matmul ran before)"
            return f"OpenBLAS ({lib})"
        return f"{name} ({lib})"
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        return f"bundled reference BLAS (slow; {OPT_OUT_ENV} is set)"
    return f"bundled reference BLAS (slow: {INSTALL_HINT})"


def set_openblas_threads(n: int) -> bool:
    """Set the loaded OpenBLAS's thread count; False when there is none (or no setter)."""
    if _loaded is None:
        return False
    try:
        ctypes.CDLL(_loaded).openblas_set_num_threads(int(n))
    except (AttributeError, OSError):
        return False
    return True
