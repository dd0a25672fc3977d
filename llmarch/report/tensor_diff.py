"""`llmarch diff --tensors`: tensors compared under one canonical naming (llama.cpp's GGUF names).

Hugging Face names are mapped with gguf-py's TensorNameMap for the document's `gguf_arch` (the
GGUF arch llama.cpp converts the family to); per-expert tensors (`...experts.7.gate_proj`) are
stacked into GGUF's `*_exps`, as llama.cpp stores them. Names no table knows are kept as they are.
"""

from __future__ import annotations

import re

EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")
LAYER_RE = re.compile(r"(^|\.)(blk|layers|h|blocks)\.(\d+)\.")
# constants derived from the config, not model weights: one format stores them, the other not
DERIVED_RE = re.compile(r"(rotary_emb\.inv_freq|^rope_freqs\.weight)$")
SUFFIXES = (".weight", ".bias")


def _name_maps(gguf_arch: str | None, n_blocks: int) -> list:
    """The arch's TensorNameMap, then llama's: gguf-py lists only the tensors llama.cpp loads
    for an arch (qwen3moe has no dense FFN, yet mlp_only_layers makes some layers dense)."""
    import gguf

    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    names = [a for a in (gguf_arch, "llama") if a in archs]
    return [gguf.get_tensor_name_map(archs[a], max(n_blocks, 1)) for a in dict.fromkeys(names)]


def canonical_tensors(tensors: dict, fmt: str, gguf_arch: str | None) -> dict[str, tuple[tuple, str]]:
    """{canonical name: (shape, dtype)}; per-expert tensors stacked (experts first)."""
    if fmt == "gguf":
        return {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    n_blocks = 1 + max((int(m.group(3)) for n in tensors if (m := LAYER_RE.search(n))), default=0)
    tmaps = _name_maps(gguf_arch, n_blocks)
    out: dict[str, tuple[tuple, str]] = {}
    experts: dict[str, list] = {}
    memo: dict[str, str] = {}
    for name, t in tensors.items():
        m = EXPERT_RE.search(name)
        key = EXPERT_RE.sub(".experts.", name, count=1) if m else name
        canon = memo.get(key)
        if canon is None:  # 256 experts share one key: map it once
            canon = memo[key] = next((n for t in tmaps if (n := t.get_name(key, try_suffixes=SUFFIXES))), key)
        if m:
            experts.setdefault(canon, []).append((int(m.group(1)), tuple(t.shape), t.dtype))
        else:
            out[canon] = (tuple(t.shape), t.dtype)
    for canon, items in experts.items():
        shapes = {s for _, s, _ in items}
        dtypes = sorted({d for _, _, d in items})
        shape = (len(items),) + shapes.pop() if len(shapes) == 1 else ("mixed",)
        out[canon] = (shape, "/".join(dtypes))
    return out


def _template(name: str) -> tuple[str, int | None]:
    m = LAYER_RE.search(name)
    if not m:
        return name, None
    return name[: m.start()] + m.group(1) + m.group(2) + ".*." + name[m.end() :], int(m.group(3))


def compare_tensors(a: dict[str, tuple], b: dict[str, tuple]) -> dict:
    """Missing/extra tensors and shape/dtype changes, per-layer repeats grouped."""
    groups: dict[tuple, list] = {}

    def add(kind: str, name: str, detail: str) -> None:
        tmpl, layer = _template(name)
        groups.setdefault((kind, tmpl, detail), []).append(layer)

    derived = []
    for name in sorted(set(a) | set(b)):
        if DERIVED_RE.search(name):
            derived.append(name)
            continue
        if name not in b:
            add("only_in_a", name, _fmt(*a[name]))
        elif name not in a:
            add("only_in_b", name, _fmt(*b[name]))
        else:
            (sa, da), (sb, db) = a[name], b[name]
            if sa != sb:
                add("shape", name, f"{list(sa)} -> {list(sb)}")
            if da != db:
                add("dtype", name, f"{da} -> {db}")
    from llmarch.arch.ranges import index_ranges

    out: dict[str, list] = {"only_in_a": [], "only_in_b": [], "shape": [], "dtype": []}
    for (kind, tmpl, detail), layers in groups.items():
        idx = sorted(l for l in layers if l is not None)
        out[kind].append(
            {"tensor": tmpl, "layers": index_ranges(idx) if idx else None, "count": len(layers), "detail": detail}
        )
    for v in out.values():
        v.sort(key=lambda e: (e["tensor"], e["layers"] or ""))
    return {
        "canonical_naming": "gguf",
        "count_a": len(a),
        "count_b": len(b),
        "common": len(set(a) & set(b)),
        "only_in_a": out["only_in_a"],
        "only_in_b": out["only_in_b"],
        "shape_changes": out["shape"],
        "dtype_changes": out["dtype"],
        "derived_ignored": derived,
        # dtype changes are storage; anything else changes what the model is
        "architecture_differs": bool(out["only_in_a"] or out["only_in_b"] or out["shape"]),
    }


def _fmt(shape: tuple, dtype: str) -> str:
    return f"{list(shape)} {dtype}"


def tensor_lines(t: dict) -> list[str]:
    lines = [f"A {t['count_a']} / B {t['count_b']} canonical tensors, {t['common']} in both"]
    for key, what in (
        ("only_in_a", "only in A"),
        ("only_in_b", "only in B"),
        ("shape_changes", "shape"),
        ("dtype_changes", "dtype"),
    ):
        for e in t[key]:
            where = f"layers {e['layers']}: " if e["layers"] else ""
            lines.append(f"{where}{e['tensor']} {what}: {e['detail']}")
    if t["derived_ignored"]:
        lines.append("ignored (derived from the config): " + ", ".join(t["derived_ignored"]))
    if len(lines) == 1:
        lines.append("no differences")
    return lines
