"""Hugging Face safetensors folder -> one GGUF file that llama.cpp loads."""

from __future__ import annotations

import resource
import time
from pathlib import Path

from llmarch.convert.gguf_meta import model_kv
from llmarch.convert.layout import family_to_gguf
from llmarch.convert.output import checkpoint_inputs, claim, refuse_overlap, source_inputs
from llmarch.convert.plan import DTYPES, Plan, build_plan
from llmarch.errors import LlmarchError


def default_dtype(ckpt) -> str:
    """Like llama.cpp's --outtype auto: keep bf16/f16 sources as they are, else f32."""
    counts = ckpt.dtype_counts()
    top = next(iter(counts), "F32")
    return {"BF16": "bf16", "F16": "f16"}.get(top, "f32")


def plan_to_gguf(source: str, dtype: str | None = None) -> tuple[Plan, object]:
    from llmarch.api import load_checkpoint_spec

    ckpt, spec = load_checkpoint_spec(source)
    if ckpt.format != "safetensors" or ckpt.config is None:
        raise LlmarchError("--to gguf needs a Hugging Face checkpoint (config.json + *.safetensors)", ckpt.path)
    dtype = dtype or default_dtype(ckpt)
    if dtype not in DTYPES:
        raise LlmarchError(f"unknown --dtype {dtype!r} for GGUF; one of {', '.join(DTYPES)}")
    fam = family_to_gguf(spec, ckpt.path)
    plan = build_plan(ckpt, spec, fam, dtype)
    name = (ckpt.config or {}).get("_name_or_path") or Path(ckpt.path).name
    plan.kv = model_kv(spec, fam.arch_name, fam.recipe, plan.file_type, name, ckpt.path)
    return plan, ckpt


def convert_to_gguf(
    source: str,
    out: str | Path,
    dtype: str | None = None,
    force: bool = False,
    threads: int | None = None,
    pre_tokenizer: str | None = None,
) -> dict:
    from llmarch.convert.tokenizer_gguf import add_tokenizer_to_gguf
    from llmarch.convert.writer import write_gguf

    out = Path(out)
    claim(out, source_inputs(source), force, folder=False)
    t0 = time.perf_counter()
    plan, ckpt = plan_to_gguf(source, dtype)
    refuse_overlap(out, checkpoint_inputs(ckpt))  # shards an index names elsewhere, a hub snapshot
    folder = ckpt.path if Path(ckpt.path).is_dir() else Path(ckpt.path).parent
    vocab = {}

    def add_metadata(w):
        for key, value, vtype in plan.kv:
            w.add_key_value(key, value, vtype)
        vocab["model"] = add_tokenizer_to_gguf(w, Path(folder), plan.spec.vocab_size, pre_tokenizer)

    write_gguf(plan, out, add_metadata, threads)
    return {
        "output": str(out),
        "arch": plan.family.arch_name,
        "tensors": len(plan.tensors),
        "bytes": out.stat().st_size,
        "tokenizer": vocab.get("model"),
        "seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
