"""What a results file says about the machine it came from: the CPU (model name and the vector
flags that decide which kernels run), the framework versions, the load average. Shared by the
benchmark scripts (run as scripts, so this directory is on their path)."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu() -> dict:
    """{"model", "cores", "flags"}: /proc/cpuinfo on Linux, the platform's name elsewhere."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return {"model": name, "cores": os.cpu_count(), "flags": [f for f in FLAGS if f in flags]}


def cpu_line() -> str:
    c = cpu()
    return f"{c['model']} ({', '.join(c['flags']) or 'no AVX2'}), {c['cores']} cores"


def versions() -> dict:
    out = {}
    for p in ("torch", "mlx", "numpy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def load1() -> float:
    return round(os.getloadavg()[0], 2)
