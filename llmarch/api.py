"""The library entry points the CLI commands call (no torch imported here)."""

from __future__ import annotations

from llmarch.arch.spec import KV_DTYPE_BYTES, ArchSpec
from llmarch.checkpoint import open_checkpoint
from llmarch.errors import LlmarchError


def load_spec(source: str | None) -> ArchSpec:
    return load_checkpoint_spec(source)[1]


def load_checkpoint_spec(source: str | None):
    """(checkpoint, spec): for callers that also need the tensor index (diff --tensors)."""
    ckpt = open_checkpoint(source)
    from llmarch.arch.fingerprint import fingerprint

    try:
        spec = fingerprint(ckpt)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:
        where = ckpt.path / "config.json" if ckpt.config is not None and ckpt.path.is_dir() else ckpt.path
        raise LlmarchError(f"config values of the wrong type or missing: {type(e).__name__}: {e}", where) from e
    spec.source = str(ckpt.path)
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
    return to_document(spec, context, kv_dtype)


def diff_sources(
    a: str, b: str, context: int | None = None, kv_dtype: str | None = None, tensors: bool = False
) -> tuple[dict, dict, dict]:
    """(diff document, doc A, doc B): each checkpoint is opened once, headers only."""
    from llmarch.report.diff import compare
    from llmarch.report.document import to_document

    check_report_options(context, kv_dtype)
    (ca, sa), (cb, sb) = load_checkpoint_spec(a), load_checkpoint_spec(b)
    # one KV dtype for both (a GGUF says f16 where its source says bf16: same bytes, same model)
    kv = kv_dtype or sa.kv_dtype_default
    da = to_document(sa, context, kv)
    db = to_document(sb, context, kv)
    tdiff = None
    if tensors:
        from llmarch.report.tensor_diff import canonical_tensors, compare_tensors

        # each side under its own GGUF arch's names (those of the arch standing in for one gguf-py
        # lacks: the recipe's gguf_tables), else the other side's
        ga, gb = ((s.recipe and s.recipe.convert.gguf_tables) or d["gguf_arch"] for s, d in ((sa, da), (sb, db)))
        tdiff = compare_tensors(
            canonical_tensors(ca.tensors, ca.format, ga or gb), canonical_tensors(cb.tensors, cb.format, gb or ga)
        )
    return compare(da, db, tdiff), da, db
