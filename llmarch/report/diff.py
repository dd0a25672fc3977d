"""`llmarch diff A B`: two inspect documents side by side.

Architecture facts and storage (format, dtypes, quantization) are compared separately, so a
GGUF and the safetensors it came from are "same architecture" with a storage difference.
Tensor names are compared in one canonical (GGUF) naming, see report/tensor_diff.py.
"""

from __future__ import annotations

from llmarch.arch.ranges import index_ranges
from llmarch.errors import printable
from llmarch.report.table import fact_rows
from llmarch.report.text import count, nbytes, plain

SCHEMA_VERSION = 1
# fact_rows rows that describe how a model is stored or labelled, not what it is
STORAGE_FACTS = {
    ("identity", "architecture"),
    ("identity", "model_type"),
    ("identity", "llmarch supports"),
    ("memory", "stored"),
}
# rows whose 3-significant-digit text can hide a real difference
EXACT = {("size", "params total"): ("params", "total"), ("size", "params active / token"): ("params", "active")}


def _arch_rows(doc: dict) -> dict[tuple[str, str], str]:
    rows = {}
    for section, fact, value in fact_rows(doc):
        if (section, fact) in STORAGE_FACTS:
            continue
        if section == "memory" and fact.startswith("KV cache"):
            fact = "KV cache"  # the dtype goes into the value, so rows line up
            value = f"{doc['kv_cache']['dtype']}: {value}"
        rows[(section, fact)] = value
    return rows


def _storage_rows(doc: dict) -> dict[tuple[str, str], str]:
    st = doc["storage"]
    return {
        ("storage", "format"): doc["format"],
        ("storage", "architecture name"): str(doc.get("architecture") or "-"),
        ("storage", "bytes"): nbytes(st["bytes"]),
        ("storage", "dtypes"): ", ".join(f"{k} {count(v)}" for k, v in st["dtypes"].items()) or "-",
    }


def _pair_rows(ra: dict, rb: dict, kind: str) -> list[dict]:
    keys = list(ra)
    for i, k in enumerate(rb):  # a row only B has goes after the row B has before it
        if k not in ra:
            prev = next((keys.index(p) for p in reversed(list(rb)[:i]) if p in keys), -1)
            keys.insert(prev + 1, k)
    return [
        {
            "section": s,
            "fact": f,
            "a": ra.get((s, f)),
            "b": rb.get((s, f)),
            "differs": ra.get((s, f)) != rb.get((s, f)),
            "kind": kind,
        }
        for s, f in keys
    ]


def _exact(rows: list[dict], a: dict, b: dict) -> None:
    """Equal text, different numbers: show the exact numbers and flag the row."""
    for row in rows:
        path = EXACT.get((row["section"], row["fact"]))
        if path and not row["differs"]:
            va, vb = a[path[0]].get(path[1]), b[path[0]].get(path[1])
            if va != vb:
                row.update(a=f"{row['a']} ({va:,})", b=f"{row['b']} ({vb:,})", differs=True)


def _layer_aspects(layer: dict | None, la_kind) -> dict[str, str]:
    if layer is None:
        return {"layer": "absent"}
    mixer = layer["mixer"]
    if mixer in ("linear", "mamba") and isinstance(la_kind, str):
        mixer = la_kind
    if layer.get("window"):
        mixer += f"({layer['window']})"
    return {"mixer": mixer, "positions": "RoPE" if layer["rope"] else "NoPE", "ffn": layer["ffn"]}


def schedule_diff(a: dict, b: dict) -> list[dict]:
    """Where the layer stacks differ: one entry per distinct (aspect, A value, B value) set,
    with the layers it covers, e.g. {'ranges': '0-2', 'text': 'ffn: dense in A, moe in B'}."""
    sa, sb = a["layer_schedule"], b["layer_schedule"]
    ka = (a.get("linear_attention") or {}).get("kind")
    kb = (b.get("linear_attention") or {}).get("kind")
    # learned absolute positions (GPT-2) are not NoPE
    groups: dict[tuple, list[int]] = {}
    for i in range(max(len(sa), len(sb))):
        xa = _layer_aspects(sa[i] if i < len(sa) else None, ka)
        xb = _layer_aspects(sb[i] if i < len(sb) else None, kb)
        if a["rope"].get("learned_positions") or b["rope"].get("learned_positions"):
            xa.pop("positions", None), xb.pop("positions", None)
        if "layer" in xa or "layer" in xb:
            key = (("layer", "only in B" if "layer" in xa else "only in A", ""),)
        else:
            key = tuple((k, xa[k], xb[k]) for k in xa if xa[k] != xb[k])
        if key:
            groups.setdefault(key, []).append(i)
    out = []
    for key, layers in sorted(groups.items(), key=lambda kv: kv[1][0]):
        if key[0][0] == "layer":
            text = key[0][1]
        else:
            text = "; ".join(f"{k} {va} in A, {vb} in B" for k, va, vb in key)
        out.append(
            {
                "layers": layers,
                "ranges": index_ranges(layers),
                "text": text,
                "aspects": {k: [va, vb] for k, va, vb in key},
            }
        )
    return out


def compare(a: dict, b: dict, tensors: dict | None = None) -> dict:
    """The diff document (`llmarch diff --json`) of two inspect documents."""
    arch = _pair_rows(_arch_rows(a), _arch_rows(b), "architecture")
    _exact(arch, a, b)
    storage = _pair_rows(_storage_rows(a), _storage_rows(b), "storage")
    sched = schedule_diff(a, b)
    arch_differs = any(r["differs"] for r in arch) or bool(sched)
    if tensors is not None and tensors["architecture_differs"]:
        arch_differs = True
    storage_differs = any(r["differs"] for r in storage) or bool(tensors and tensors["dtype_changes"])
    same_source = a.get("source") is not None and a.get("source") == b.get("source")
    verdict = (
        "identical"
        if not arch_differs and not storage_differs
        else "same architecture; storage differs"
        if not arch_differs
        else "different architecture"
    )
    return {
        "schema": SCHEMA_VERSION,
        "a": {"source": a.get("source"), "format": a["format"], "family": a["family"]},
        "b": {"source": b.get("source"), "format": b["format"], "family": b["family"]},
        "verdict": verdict,
        "identical": verdict == "identical",
        "same_architecture": not arch_differs,
        "same_source": same_source,
        "rows": arch,
        "schedule": sched,
        "storage": storage,
        "tensors": tensors,
        "warnings": {"a": a.get("warnings", []), "b": b.get("warnings", [])},
    }


def exit_status(d: dict) -> int:
    """diff(1) convention: 0 same architecture, 1 different (2, errors, is the CLI's)."""
    return 0 if d["same_architecture"] else 1


# ----------------------------------------------------------------------------- output


def _shown(rows: list[dict], show_all: bool) -> tuple[list[dict], int]:
    shown = [r for r in rows if show_all or r["differs"]]
    return shown, len(rows) - len(shown)


def print_diff(d: dict, console, show_all: bool = False) -> None:
    """Every text that may come from the files (sources, names, values, warnings) goes to rich
    as plain(): shown literally, never as markup, control characters escaped."""
    from rich.table import Table

    a, b = d["a"], d["b"]
    console.print(plain(f"A: {a['source']}  [{a['format']}, {a['family']}]"))
    console.print(plain(f"B: {b['source']}  [{b['format']}, {b['family']}]"))
    for title, rows in (("architecture", d["rows"]), ("storage", d["storage"])):
        shown, folded = _shown(rows, show_all)
        if shown:
            t = Table(title=title, header_style="bold")
            for col in ("section", "fact", "A", "B"):
                t.add_column(col, style="dim" if col == "section" else None)
            last = None
            for r in shown:
                style = "bold yellow" if r["differs"] else None
                mark = "≠ " if r["differs"] else "  "
                t.add_row(
                    r["section"] if r["section"] != last else "",
                    plain(mark + r["fact"]),
                    plain(r["a"]) if r["a"] is not None else "(absent)",
                    plain(r["b"]) if r["b"] is not None else "(absent)",
                    style=style,
                )
                last = r["section"]
            console.print(t)
        if folded:
            console.print(f"[dim]{title}: {folded} identical rows folded (--all shows them)[/]")
    if d["schedule"]:
        console.print("[bold]layer schedule[/]")
        for s in d["schedule"]:
            console.print(plain(f"  layers {s['ranges']}: {s['text']}"))
    if d["tensors"] is not None:
        from llmarch.report.tensor_diff import tensor_lines

        console.print("[bold]tensors[/]")
        for line in tensor_lines(d["tensors"]):
            console.print(plain("  " + line))
    for side in ("a", "b"):
        for w in d["warnings"][side]:
            console.print(plain(f"warning ({side.upper()}): ", "yellow") + plain(w))
    console.print(f"[bold]{d['verdict']}[/]")


def markdown(d: dict, show_all: bool = False) -> str:
    """Markdown tables; text from the files has its control characters escaped (a newline would
    end a table row) and its `|` escaped in table cells."""
    a, b = d["a"], d["b"]
    out = [
        f"**A**: `{a['source']}` ({a['format']}, {a['family']})  ",
        f"**B**: `{b['source']}` ({b['format']}, {b['family']})",
        "",
    ]
    for title, rows in (("Architecture", d["rows"]), ("Storage", d["storage"])):
        shown, folded = _shown(rows, show_all)
        out.append(f"### {title}")
        if shown:
            out += ["", "| section | fact | A | B |", "|---|---|---|---|"]
            for r in shown:
                cells = [_md(r["a"]), _md(r["b"])]
                if r["differs"]:
                    cells = [f"**{c}**" for c in cells]
                out.append(f"| {r['section']} | {_md(r['fact'])} | {cells[0]} | {cells[1]} |")
        out += ["", f"{folded} identical rows folded (--all shows them).", ""] if folded else [""]
    if d["schedule"]:
        out += ["### Layer schedule", ""] + [f"- layers {s['ranges']}: {s['text']}" for s in d["schedule"]] + [""]
    if d["tensors"] is not None:
        from llmarch.report.tensor_diff import tensor_lines

        out += ["### Tensors", "", "```"] + tensor_lines(d["tensors"]) + ["```", ""]
    out.append(f"**Verdict: {d['verdict']}**")
    return "\n".join(printable(line) for line in out) + "\n"


def _md(v) -> str:
    return "(absent)" if v is None else printable(str(v)).replace("|", "\\|")
