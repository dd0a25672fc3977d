"""Build a C source with the system compiler once per machine and load it with ctypes (the CPU
kernels: cpu_kernels.py's block matmul and decode ops, gguf_matmul.py's stored-block matmul,
experts/moe_cpu.c's routed experts). No torch headers, so a build takes seconds, not minutes; the .so is
cached under LLMARCH_CACHE (default ~/.cache/llmarch), keyed by the source, the flags and the CPU's
feature flags (a -march=native build must not move machines)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """LLMARCH_CACHE/<kind> (default ~/.cache/llmarch/<kind>): kernels, ple (--ple disk's row files)."""
    base = os.environ.get("LLMARCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmarch")
    return Path(base) / kind


def _cpu_flags() -> str:
    try:
        return next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
    except OSError:
        return ""


def build(name: str, source: str, flags: list[str], parts: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile `source` (and `parts`, more translation units of the same library, compiled side by
    side with it: a first run waits for the slowest unit, not for their sum) to
    <cache>/kernels/<name>_<key>.so unless there, and load it.
    Raises OSError / subprocess.SubprocessError when there is no working compiler."""
    key = hashlib.sha256("\0".join([source, *parts, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
    so = cache_dir("kernels") / f"{name}_{key}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "cc")
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            out = Path(tmp) / so.name
            units = []
            for i, text in enumerate((source, *parts)):
                units.append(Path(tmp) / f"{name}_{i}.c")
                units[-1].write_text(text)
            objects = _compile_side_by_side(cc, flags, units) if parts else [str(units[0])]
            subprocess.run(
                [cc, *flags, "-shared", "-fPIC", *objects, "-o", str(out), "-lm"],
                check=True,
                capture_output=True,
                timeout=120,
            )
            os.replace(out, so)  # atomic: a concurrent builder never loads a half-written file
    return ctypes.CDLL(str(so))


def _compile_side_by_side(cc: str, flags: list[str], units: list[Path]) -> list[str]:
    """Each unit to its object file, all compilers running at once -> the object files' paths.
    Raises subprocess.SubprocessError when one fails or runs past 120 s (the others are stopped)."""
    objects = [str(u.with_suffix(".o")) for u in units]
    procs = [
        subprocess.Popen(
            [cc, *flags, "-fPIC", "-c", str(u), "-o", o], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for u, o in zip(units, objects)
    ]
    try:
        for p in procs:
            _, err = p.communicate(timeout=120)
            if p.returncode:
                raise subprocess.CalledProcessError(p.returncode, p.args, stderr=err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return objects


def has_avx2() -> bool:
    """Whether this CPU runs the AVX2 + FMA + F16C kernels: read from /proc/cpuinfo where there is one
    (no torch import: the native run starts without it), else from torch's CPU capability."""
    flags = _cpu_flags().split()
    if flags:
        return {"avx2", "fma", "f16c"} <= set(flags)
    import torch

    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def build_avx2(name: str, source: str, flags: list[str], parts: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """build() for a kernel written for AVX2, where it can run: None when LLMARCH_NO_CKERNEL is
    set, when this CPU lacks AVX2, or when there is no working compiler (the caller then takes its
    torch path: same results, slower)."""
    if os.environ.get("LLMARCH_NO_CKERNEL") or not has_avx2():
        return None
    try:
        return build(name, source, flags, parts)
    except (OSError, subprocess.SubprocessError):
        return None
