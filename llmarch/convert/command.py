"""What `llmarch convert` does, behind the thin CLI function: pick the direction, run, report."""

from __future__ import annotations

import sys
from pathlib import Path

from llmarch.errors import LlmarchError


def run_convert(
    source: str,
    output: str | None,
    to: str | None,
    dtype: str | None,
    force: bool,
    dry_run: bool,
    verify: bool,
    threads: int | None,
    pre_tokenizer: str | None,
) -> dict:
    is_gguf = Path(source).suffix.lower() == ".gguf"
    to = (to or ("safetensors" if is_gguf else "gguf")).lower()
    if to not in ("gguf", "safetensors"):
        raise LlmarchError(f"--to must be gguf or safetensors, not {to!r}")
    if to == "safetensors" and not is_gguf or to == "gguf" and is_gguf:
        raise LlmarchError(
            f"source is already {'GGUF' if is_gguf else 'safetensors'}; --to {to} converts from the other format",
            source,
        )
    if to == "gguf":
        from llmarch.convert.to_gguf import convert_to_gguf, plan_to_gguf

        if dry_run:
            from llmarch.convert.plan import describe

            plan, _ = plan_to_gguf(source, dtype)
            return {
                "dry_run": True,
                "arch": plan.family.arch_name,
                "file_type": plan.file_type.name,
                "bytes": plan.nbytes,
                "metadata": {k: v for k, v, _ in plan.kv},
                "tensors": describe(plan),
            }
        if not output:
            raise LlmarchError("-o/--output is required (a .gguf path)")
        doc = convert_to_gguf(source, output, dtype, force, threads, pre_tokenizer)
    else:
        if dry_run:
            raise LlmarchError("--dry-run is for --to gguf")
        if not output:
            raise LlmarchError("-o/--output is required (a folder)")
        from llmarch.convert.from_gguf import convert_from_gguf

        doc = convert_from_gguf(source, output, dtype or "f32", force, threads)
    if verify:
        from llmarch.convert.verify import verify_pair
        from llmarch.progress import progress

        with progress("verifying: running source and output"):
            doc["verify"] = verify_pair(source, output)
    return doc


def print_result(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from llmarch.report.text import plain  # names from the source file: not markup, no control characters

    console = Console()
    if doc.get("dry_run"):
        table = Table(title=plain(f"GGUF plan: {doc['arch']}, {doc['file_type']}, {doc['bytes'] / 2**20:.1f} MiB"))
        for col in ("tensor", "type", "shape", "bytes", "from"):
            table.add_column(col)
        for t in doc["tensors"]:
            table.add_row(
                plain(t["name"]), t["type"], "x".join(map(str, t["shape"])), f"{t['bytes']:,}", plain(t["source"])
            )
        console.print(table)
        return
    # one line each, written as is: never wrapped at the terminal width, never read as markup
    parts = [f"wrote {doc['output']}"] + [
        f"{k}={'none' if v is None else v}" for k, v in doc.items() if k not in ("output", "verify")
    ]
    sys.stdout.write(", ".join(parts) + "\n")
    v = doc.get("verify")
    if v:
        sys.stdout.write(
            f"verify ({v['backend']}): token agreement {v['token_agreement']:.3f}, "
            f"logit NMSE {v['nmse']:.2e} over {v['prompts']} prompts -> {v['verdict']}\n"
        )
