"""moe_cpu.c: the routed experts computed on the CPU straight from their quantized bytes, built for
this CPU with the system compiler on first use (cbuild) and called through ctypes."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import numpy as np

from llmarch.errors import LlmarchError
from llmarch.runtime.cbuild import build
from llmarch.runtime.experts.formats import G

_LIB = None


def cpu_kernel():
    """moe_cpu.c, built for this CPU (-march=native) on first use."""
    global _LIB
    if _LIB is None:
        try:
            _LIB = build(
                "moe_cpu", Path(__file__).with_name("moe_cpu.c").read_text(), ["-O3", "-march=native", "-fopenmp"]
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise LlmarchError(
                f"--expert-bits 8/4 on the CPU needs a C compiler ({os.environ.get('CC', 'cc')}) "
                f"to build its kernel: {e}"
            ) from e
        _LIB.moe_experts.restype = _LIB.moe_decode.restype = None
    return _LIB


def kernel_scratch(d: int, I: int, rows: int) -> tuple:
    """moe_experts' work buffers for `rows` (expert, token) pairs: XQ, XS, H, AQ, AS, Y."""
    return (
        np.empty((rows, d), np.int8),
        np.empty((rows, 2 * (d // G)), np.float32),
        np.empty((rows, 2 * I), np.float32),
        np.empty((rows, I), np.int8),
        np.empty((rows, 2 * max(I // G, 1)), np.float32),
        np.empty((rows, d), np.float32),
    )


def ptr(t) -> ctypes.c_void_p:
    """The address of a torch tensor or numpy array for the kernel (NULL for None)."""
    if t is None:
        return ctypes.c_void_p(0)
    return ctypes.c_void_p(t.ctypes.data if isinstance(t, np.ndarray) else t.data_ptr())


class DecodeCtx(ctypes.Structure):  # moe_cpu.c's moe_decode_ctx
    _fields_ = (
        [(n, ctypes.c_int) for n in ("bits", "k", "d", "I", "act", "weight_input")]
        + [("alpha", ctypes.c_float), ("limit", ctypes.c_float)]
        + [
            (n, ctypes.c_void_p)
            for n in ("pack", "out", "gu_q", "dn_q", "gu_s", "dn_s", "gu_b", "dn_b", "XQ", "AQ", "XS", "H", "AS", "Y")
        ]
    )
