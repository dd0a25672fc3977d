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
        _LIB.moe_step.restype = ctypes.c_int
    return _LIB


def kernel_scratch(d: int, I: int, rows: int) -> tuple:
    """moe_experts' work buffers for `rows` (expert, token) pairs: XQ, XS, H, AQ, AS, Y (XS and AS:
    moe_cpu.c's XSN floats per row, 4 per group of G)."""
    return (
        np.empty((rows, d), np.int8),
        np.empty((rows, 4 * (d // G)), np.float32),
        np.empty((rows, 2 * I), np.float32),
        np.empty((rows, I), np.int8),
        np.empty((rows, 4 * max(I // G, 1)), np.float32),
        np.empty((rows, d), np.float32),
    )


def ptr(t) -> ctypes.c_void_p:
    """The address of a torch tensor or numpy array for the kernel (NULL for None)."""
    if t is None:
        return ctypes.c_void_p(0)
    return ctypes.c_void_p(t.ctypes.data if isinstance(t, np.ndarray) else t.data_ptr())


# moe_cpu.c's act_fn codes, by the config's activation name (1 is gpt-oss's clamped SwiGLU)
KERNEL_ACTIVATIONS = {
    "silu": 0,
    "swish": 0,
    "relu2": 2,
    "relu": 3,
    "gelu_pytorch_tanh": 4,
    "gelu_new": 4,
    "gelu_fast": 4,
    "gelu": 5,
}


def kernel_activation(act) -> int:
    """moe_cpu.c's code for an ExpertAct (gated or not: the kernel takes that separately)."""
    if act.clamped:
        return 1
    code = KERNEL_ACTIVATIONS.get(act.name)
    if code is None:
        raise LlmarchError(
            f"the CPU expert kernel has no activation {act.name!r} (it has {', '.join(KERNEL_ACTIVATIONS)}); "
            "use --expert-bits 16"
        )
    return code


class DecodeCtx(ctypes.Structure):  # moe_cpu.c's moe_decode_ctx
    _fields_ = (
        [(n, ctypes.c_int) for n in ("bits", "k", "d", "I", "act", "gated", "weight_input")]
        + [("alpha", ctypes.c_float), ("limit", ctypes.c_float)]
        + [
            (n, ctypes.c_void_p)
            for n in (
                "pack",
                "out",
                "gu_q",
                "up_q",
                "dn_q",
                "gu_s",
                "dn_s",
                "gu_b",
                "dn_b",
                "XQ",
                "AQ",
                "XS",
                "H",
                "AS",
                "Y",
            )
        ]
    )


class StepPlan(ctypes.Structure):  # moe_cpu.c's moe_step_plan
    _fields_ = (
        [("n", ctypes.c_int)]
        + [(n, ctypes.c_void_p) for n in ("launch", "wait", "stream", "graphs", "events", "ctxs", "times")]
        + [("wait_value", ctypes.c_void_p), ("flag", ctypes.c_void_p), ("flag_dev", ctypes.c_uint64)]
    )


def pointer_array(addresses: list[int]) -> ctypes.Array:
    """A C array of void * (hold it as long as the kernel may read it)."""
    return (ctypes.c_void_p * len(addresses))(*addresses)
