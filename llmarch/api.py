"""The library entry points the CLI commands call (no torch imported here)."""

from __future__ import annotations

from llmarch.checkpoint import open_checkpoint
from llmarch.errors import LlmarchError
from llmarch.spec import KV_DTYPE_BYTES, ArchSpec


def load_spec(source: str | None) -> ArchSpec:
    return load_checkpoint_spec(source)[1]


def load_checkpoint_spec(source: str | None):
    """(checkpoint, spec): for callers that also need the tensor index (diff --tensors)."""
    ckpt = open_checkpoint(source)
    from llmarch.fingerprint import fingerprint

    try:
        spec = fingerprint(ckpt)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:
        where = ckpt.path / "config.json" if ckpt.config is not None and ckpt.path.is_dir() else ckpt.path
        raise LlmarchError(f"config values of the wrong type or missing: {type(e).__name__}: {e}", where) from e
    spec.extras.setdefault("source", str(ckpt.path))
    return ckpt, spec


def check_report_options(context: int | None, kv_dtype: str | None) -> None:
    """--context and --kv-dtype of inspect and diff, checked before any checkpoint is opened."""
    if kv_dtype is not None and kv_dtype not in KV_DTYPE_BYTES:
        raise LlmarchError(f"unknown --kv-dtype {kv_dtype!r}; one of {', '.join(KV_DTYPE_BYTES)}")
    if context is not None and context <= 0:
        raise LlmarchError(f"--context must be positive, got {context}")


def inspect_source(source: str | None, context: int | None = None, kv_dtype: str | None = None) -> dict:
    from llmarch.report.document import to_document

    check_report_options(context, kv_dtype)
    spec = load_spec(source)
    return to_document(spec, context, kv_dtype, source=spec.extras.pop("source"))
