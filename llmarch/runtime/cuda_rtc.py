"""CUDA C++ kernels compiled at run time by NVRTC and launched on torch's current stream.

Why: a few decode kernels need what Triton does not expose (bulk copies into shared memory that
complete on an mbarrier, issued before a programmatic dependent launch waits). NVRTC is the
library CUDA builds of torch already load (their JIT fusers use it), so this needs no compiler on
the machine and no build step: the source is compiled for the device's own architecture on first
use (tens of milliseconds a configuration) and the cubin loaded into torch's context.

Launches go through the driver's cuLaunchKernelEx so that a kernel can be a programmatic dependent
launch; CUDA graph capture records them like any launch on the capturing stream.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from functools import cache
from pathlib import Path

import torch

# cuLaunchKernelEx's attribute letting the kernel start before the one before it on the stream
# ends (its `griddepcontrol.wait` then waits for that kernel's writes)
_PROGRAMMATIC_STREAM_SERIALIZATION = 6
_MAX_DYNAMIC_SHARED_SIZE = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


class _Value(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("i", ctypes.c_int), ("u64", ctypes.c_uint64)]


class _Attribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _Value)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid_x", ctypes.c_uint),
        ("grid_y", ctypes.c_uint),
        ("grid_z", ctypes.c_uint),
        ("block_x", ctypes.c_uint),
        ("block_y", ctypes.c_uint),
        ("block_z", ctypes.c_uint),
        ("shared_bytes", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_Attribute)),
        ("num_attrs", ctypes.c_uint),
    ]


class RtcError(RuntimeError):
    """NVRTC or the driver refused: the caller falls back to another kernel."""


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RtcError(f"{what} failed (CUDA error {rc})")


@cache
def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    """(libcuda, libnvrtc), or None where this torch has no CUDA or the libraries cannot be opened."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    nvrtc = open_nvrtc(torch.version.cuda.split(".")[0])
    return None if nvrtc is None else (cuda, nvrtc)


def open_nvrtc(major: str) -> ctypes.CDLL | None:
    """NVRTC of CUDA `major`: by its name (already loaded, or on the loader's path), else from the
    nvidia-* wheels on sys.path; None where neither opens."""
    for name in (f"libnvrtc.so.{major}", "libnvrtc.so", *nvrtc_in_packages(major, sys.path)):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def nvrtc_in_packages(major: str, roots: list[str]) -> list[str]:
    """libnvrtc files of CUDA `major` in the nvidia-* wheels under these import roots (pip's CUDA
    torch brings one there, and the loader's search path may not include it)."""
    found = []
    for root in roots:
        for sub in ("nvidia/cuda_nvrtc/lib", f"nvidia/cu{major}/lib"):
            found += sorted(str(p) for p in Path(root, sub).glob(f"libnvrtc.so.{major}*"))
    return found


def available() -> bool:
    return _libraries() is not None


def compile_cubin(nvrtc: ctypes.CDLL, source: str, arch: str) -> bytes:
    """source compiled for `arch` (sm_XY) by this NVRTC; RtcError with the compiler's log where it fails."""
    prog = ctypes.c_void_p()
    _check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None), "nvrtc")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
        if nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RtcError(f"NVRTC could not compile the kernel: {log.value.decode(errors='replace')[-1000:]}")
        size = ctypes.c_size_t()
        _check(nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


class Kernel:
    """One compiled kernel on one device, launched with a fixed block and dynamic shared memory."""

    def __init__(self, func: ctypes.c_void_p, device_index: int, threads: int, shared_bytes: int, keep: tuple) -> None:
        self.func, self.device_index, self.threads, self.shared_bytes = func, device_index, threads, shared_bytes
        self._keep = keep  # the module and cubin the handle lives in

    def launch(self, grid: int, args: list, dependent: bool = False) -> None:
        """Launch on its device's current stream. args: tensors (their data pointers; None: a null pointer),
        ints (C int) and floats (C float), in the kernel's order. dependent: as a programmatic
        dependent launch (the kernel must `griddepcontrol.wait` before it reads what the kernel
        before it writes)."""
        values = []
        for a in args:
            if a is None or isinstance(a, torch.Tensor):
                values.append(ctypes.c_void_p(0 if a is None else a.data_ptr()))
            elif isinstance(a, float):
                values.append(ctypes.c_float(a))
            else:
                values.append(ctypes.c_int(int(a)))
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        attr = _Attribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value.i = 1
        stream = torch.cuda.current_stream(self.device_index).cuda_stream
        config = _LaunchConfig(
            grid, 1, 1, self.threads, 1, 1, self.shared_bytes, stream, ctypes.pointer(attr), 1 if dependent else 0,
        )  # fmt: skip
        cuda = _libraries()[0]  # type: ignore[index]
        if torch.cuda.current_device() == self.device_index:
            rc = cuda.cuLaunchKernelEx(ctypes.byref(config), self.func, pointers, None)
        else:  # the kernel's module lives in its device's context
            with torch.cuda.device(self.device_index):
                rc = cuda.cuLaunchKernelEx(ctypes.byref(config), self.func, pointers, None)
        _check(rc, "cuLaunchKernelEx")


_lock = threading.Lock()


@cache
def kernel(source: str, name: str, device_index: int, threads: int, shared_bytes: int) -> Kernel:
    """`name` (an extern "C" kernel of `source`) compiled for the device's architecture and loaded
    into its context, allowed `shared_bytes` of dynamic shared memory. Raises RtcError."""
    with _lock, torch.cuda.device(device_index):
        major, minor = torch.cuda.get_device_capability(device_index)
        libs = _libraries()
        if libs is None:
            raise RtcError("NVRTC is not available")
        cubin = compile_cubin(libs[1], source, f"sm_{major}{minor}")
        torch.empty(1, device=f"cuda:{device_index}")  # the context is current on this thread
        cuda = _libraries()[0]  # type: ignore[index]
        module, func = ctypes.c_void_p(), ctypes.c_void_p()
        _check(cuda.cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
        _check(cuda.cuModuleGetFunction(ctypes.byref(func), module, name.encode()), "cuModuleGetFunction")
        if shared_bytes > 48 * 1024:
            _check(cuda.cuFuncSetAttribute(func, _MAX_DYNAMIC_SHARED_SIZE, shared_bytes), "cuFuncSetAttribute")
        return Kernel(func, device_index, threads, shared_bytes, (module, cubin))
