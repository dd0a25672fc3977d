"""The rich report of `llmarch fit`: memory by part, then each runtime's placement and command."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from llmarch.plan.memory import UPLOAD_TOKENS
from llmarch.report.text import count, literal, nbytes

PART_NAMES = {
    "dense": "dense (attention, dense FFN, shared experts, norms)",
    "routed_experts": "routed experts",
    "embeddings": "input embedding",
    "output_head": "output head",
    "ple": "per-layer embeddings",
    "vision": "vision/audio towers",
    "mtp": "MTP layers",
}


def _machine(m: dict) -> str:
    host = nbytes(m["host_memory"]) if m["host_memory"] is not None else "unknown"
    return f"{m['gpus']} x {nbytes(m['gpu_memory'])} GPU, {host} host RAM"


def print_fit(doc: dict, console: Console) -> None:
    t = Table(title=f"{literal(doc['source'])}: memory at context {doc['context']} ({doc['kv_dtype']} cache)")
    t.add_column("part")
    t.add_column("params", justify="right")
    t.add_column("bytes", justify="right")
    for part, b in doc["weights"].items():
        if b or doc["params"].get(part):
            t.add_row(PART_NAMES[part], count(doc["params"].get(part)), nbytes(b))
    t.add_row("KV cache", "", nbytes(doc["kv_cache"]))
    if doc["recurrent_state"]:
        t.add_row("recurrent state", "", nbytes(doc["recurrent_state"]))
    t.add_row("runtime overhead (CUDA context, compute buffer)", "", nbytes(doc["overhead"]))
    t.add_row("[b]total[/b]", "", f"[b]{nbytes(doc['total'])}[/b]")
    console.print(t)
    verdict = "fits" if doc["fits"] else "does not fit"
    console.print(
        f"on {_machine(doc['machine'])}: weights as stored {verdict} on the GPUs; "
        f"largest context there: {doc['largest_context'] or 'none'} (model: {doc['model_context']})"
    )
    console.print(f"[dim]{literal(doc['assumptions'])}[/dim]")

    r = doc["llmarch_run"]
    console.print("\n[b]llmarch run[/b] (one GPU)")
    if not r.get("supported") or not r.get("fits"):
        console.print(f"  {literal(r['reason'])}")
    else:
        bits = {16: "16-bit", 8: "int8", 4: "int4", "mxfp4": "MXFP4"}.get(r["expert_bits"], "")
        where = f"{bits} experts on the {r['experts'].upper()}" if r["experts"] else "weights on the GPU"
        if r.get("ple"):
            where += f", per-layer embeddings on the {r['ple'].upper()}"
        if r.get("keep_quantized"):
            where += " (8-bit, --keep-quantized)"
        console.print(
            f"  {where}: {nbytes(r['gpu_bytes'])} on the GPU, {nbytes(r['host_bytes'])} in host RAM, "
            f"context {r['context']} (largest {r['largest_context']})"
        )
        if r.get("gpu_prompt_upload"):
            console.print(
                f"  a prompt of {UPLOAD_TOKENS}+ tokens also takes up to {nbytes(r['gpu_prompt_upload'])} of the GPU "
                "while it dequantizes host experts there (at most a quarter of what is free)"
            )
        console.print(f"  {literal(r['command'])}", soft_wrap=True)

    c = doc["llama_cpp"]
    console.print("\n[b]llama.cpp[/b]")
    if not c.get("supported") or not c.get("fits"):
        console.print(f"  {literal(c.get('reason', 'no placement fits'))}")
    if c.get("supported"):
        layers = "all layers" if c["all_layers"] else f"{c['ngl']} layers"
        moe = f", experts of the first {c['n_cpu_moe']} layers in host RAM" if c["n_cpu_moe"] else ""
        console.print(
            f"  {layers} on the GPUs{moe}: {nbytes(c['gpu_bytes'])} on the GPUs, {nbytes(c['host_bytes'])} "
            f"in host RAM, context {c['context']} (largest {c['largest_context']})"
        )
        if c.get("convert"):
            console.print(f"  {literal(c['convert'])}", soft_wrap=True)
        console.print(f"  {literal(c['command'])}", soft_wrap=True)

    s = doc["serving"]
    if s.get("needed") or doc["machine"]["gpus"] > 1:
        console.print("\n[b]vLLM / SGLang[/b]")
        if not s.get("fits"):
            console.print(f"  {literal(s['reason'])}")
        else:
            console.print(
                f"  {s['gpus']} GPUs on {s['hosts']} host(s): tensor parallel {s['tensor_parallel']}, "
                f"pipeline {s['pipeline_parallel']}"
                + (
                    f", experts over {s['expert_parallel']['vllm']} (vLLM) / {s['expert_parallel']['sglang']} (SGLang) GPUs"
                    if s["expert_parallel"]
                    else ""
                )
            )
            console.print(f"  {literal(s['vllm'])}", soft_wrap=True)
            console.print(f"  {literal(s['sglang'])}", soft_wrap=True)
            console.print(f"  [dim]{literal(s['note'])}[/dim]")
