"""What the diagram's boxes say: the parts of a block, in order, from an inspect document."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmarch.arch.spec import LayerSpec
from llmarch.report.text import count, tokens

KIND_NAMES = {
    "MHA": "Multi-head attention",
    "GQA": "Grouped-query attention",
    "MQA": "Multi-query attention",
    "MLA": "Multi-head latent attention",
}
LINEAR_NAMES = {
    "gated_deltanet": "Gated DeltaNet",
    "kda": "Kimi Delta Attention",
    "mamba2": "Mamba-2",
    "mamba": "Mamba",
}
ACT_NAMES = {
    "silu": "SwiGLU",
    "swiglu": "SwiGLU",
    "gelu_pytorch_tanh": "GeGLU",
    "gelu_new": "GELU",
    "gelu": "GELU",
    "relu2": "ReLU²",
    "relu": "ReLU",
}


@dataclass
class Part:
    role: str  # norm | attn | ffn | add | embed | head
    title: str
    lines: list[str] = field(default_factory=list)
    color: str = ""
    dashed: bool = False
    note: str = ""  # side note (MTP layers, per-layer embeddings)

    def signature(self) -> tuple:
        return (self.role, self.title, tuple(self.lines))


def layers_from_doc(doc: dict) -> list[LayerSpec]:
    kind = (doc.get("linear_attention") or {}).get("kind")
    return [
        LayerSpec(
            index=i,
            mixer=l["mixer"],
            window=l.get("window"),
            rope=l["rope"],
            ffn=l["ffn"],
            linear_kind=kind if isinstance(kind, str) and l["mixer"] in ("linear", "mamba") else None,
            norm_placement=l.get("norm_placement"),
        )
        for i, l in enumerate(doc["layer_schedule"])
    ]


def _norm(doc: dict, where: str = "") -> Part:
    kind = "RMSNorm" if doc["norm"]["kind"] == "rms" else "LayerNorm"
    return Part("norm", f"{kind} {where}".strip(), color="norm")


def _positions(doc: dict, layer: LayerSpec) -> str | None:
    r = doc["rope"]
    if r.get("learned_positions"):
        return None
    if not layer.rope:
        return "NoPE"
    theta = r.get("local_theta") if layer.mixer == "sliding" and r.get("local_theta") else r.get("theta")
    s = "RoPE" + (f" θ {count(theta)}" if theta else "")
    if r.get("partial") and r["partial"] != 1:
        s += f", partial {r['partial']:.3g}"
    if r.get("scaling"):
        s += f", {r['scaling'].get('type', 'scaled')}"
    return s


def mixer_part(doc: dict, layer: LayerSpec) -> Part:
    a = doc["attention"]
    if layer.mixer in ("linear", "mamba"):
        kind = layer.linear_kind or layer.mixer
        return Part("attn", LINEAR_NAMES.get(kind, kind), ["linear attention, fixed-size state"], color="linear")
    kind = "MLA" if layer.mixer == "mla" or a["kind"] == "MLA" else a["kind"]
    name = KIND_NAMES.get(kind, kind)
    if layer.mixer == "sliding":
        title = f"Sliding-window {kind} ({layer.window})"
    elif layer.mixer == "chunked":
        title = f"Chunked {kind} ({layer.window})"
    else:
        title = name
    if kind == "MLA" and a.get("mla"):
        m = a["mla"]
        heads = f"{a['heads']} heads, KV latent {m['kv_lora_rank']}" + (
            f", Q latent {m['q_lora_rank']}" if m.get("q_lora_rank") else ""
        )
    elif kind == "MHA":
        heads = f"{a['heads']} heads × {a['head_dim']}"
    else:
        heads = f"{a['heads']} heads, {a['kv_heads']} KV head{'s' if a['kv_heads'] != 1 else ''} × {a['head_dim']}"
    extra = [
        p
        for p in (
            _positions(doc, layer),
            a.get("qk_norm") and ("QK-norm" if a["qk_norm"] in ("per_head", "whole") else f"QK {a['qk_norm']}-norm"),
            a.get("bias") and "qkv bias",
            a.get("sinks") and "sinks",
            a.get("gated") and "gated output",
            a.get("indexer") and "sparse indexer",
        )
        if p
    ]
    lines = [heads] + _wrap(extra)
    color = {"sliding": "sliding", "chunked": "chunked"}.get(layer.mixer, "mla" if kind == "MLA" else "attn")
    return Part("attn", title, lines, color=color)


def _wrap(items: list[str], per_line: int = 40) -> list[str]:
    """Join items with commas over lines of about per_line characters."""
    lines: list[str] = []
    for it in items:
        if lines and len(lines[-1]) + 2 + len(it) <= per_line:
            lines[-1] += ", " + it
        else:
            lines.append(it)
    return lines


def ffn_part(doc: dict, layer: LayerSpec) -> Part:
    f, moe = doc["ffn"], doc["moe"]
    act = ACT_NAMES.get(f.get("activation") or "", f.get("activation"))
    if layer.ffn == "moe" and moe:
        lines = [f"{moe['experts']} experts, top-{moe['experts_per_token']}"]
        if moe.get("shared_experts"):
            lines[0] += f" + {moe['shared_experts']} shared" + (" (gated)" if moe.get("shared_gated") else "")
        lines.append(f"expert width {moe.get('expert_ffn') or '?'}" + (f", {act}" if act else ""))
        return Part("ffn", "Mixture of experts", lines, color="moe")
    width = f.get("intermediate_size")
    return Part(
        "ffn",
        "Feed forward" + (f" ({act})" if act else ""),
        [f"{doc['hidden_size']} → {width} → {doc['hidden_size']}"],
        color="ffn",
    )


def block_parts(doc: dict, layer: LayerSpec) -> list[Part]:
    """Bottom to top, residual adds included; norm placement (the layer's own where it differs
    from the model's) decides where norms go."""
    placement = layer.norm_placement or doc["norm"]["placement"]
    out: list[Part] = []
    for sub in ("mixer", "ffn"):
        if (sub == "mixer" and layer.mixer == "none") or (sub == "ffn" and layer.ffn == "none"):
            continue
        body = mixer_part(doc, layer) if sub == "mixer" else ffn_part(doc, layer)
        if placement == "post":
            out += [body, _norm(doc, "(post)")]
        elif placement == "sandwich":
            out += [_norm(doc), body, _norm(doc, "(post)")]
        else:
            out += [_norm(doc), body]
        out.append(Part("add", "+", color="add"))
    return out


def head_parts(doc: dict) -> tuple[list[Part], list[Part]]:
    """([LM head, final norm] top-down, [token embedding])."""
    v, d = doc["vocab_size"], doc["hidden_size"]
    head = Part(
        "head",
        "Linear output layer",
        [f"{d:,} → {v:,}" + (" (tied to embedding)" if doc["tied_embeddings"] else "")],
        color="head",
    )
    if doc.get("mtp_layers"):
        head.note = f"+ {doc['mtp_layers']} MTP layer{'s' if doc['mtp_layers'] > 1 else ''}"
    final = _norm(doc, "(final)")
    emb_lines = [f"{v:,} × {d:,}"]
    if doc.get("embedding_scale"):
        emb_lines[0] += ", scaled by √d"
    if doc["rope"].get("learned_positions"):
        emb_lines.append("+ learned position embedding")
    emb = Part("embed", "Token embedding", emb_lines, color="embed")
    ple = doc.get("per_layer_embeddings")
    if ple:
        emb.note = f"+ per-layer embeddings ({count(ple.get('params'))})"
    return [head, final], [emb]


def title_lines(doc: dict) -> list[str]:
    p = doc["params"]
    active = f" · {count(p.get('active'))} active" if p.get("active") and p.get("active") != p.get("total") else ""
    fam = doc["family"] + (f" ({doc['text_family']})" if doc.get("text_family") else "")
    return [
        f"{fam} · {count(p.get('total'))} params{active}",
        f"{doc['layers']} layers · d {doc['hidden_size']:,} · vocab {doc['vocab_size']:,} · "
        f"context {tokens(doc.get('context_length'))}",
    ] + _wrap(_extras(doc), 90)


def _extras(doc: dict) -> list[str]:
    """Whole-model features a block drawing does not show (Gemma 3n's KV sharing, AltUp, ...)."""
    from llmarch.arch.ranges import index_ranges

    out = []
    for k, v in (doc.get("extras") or {}).items():
        if k == "intermediate_size_per_layer":
            continue
        if k == "kv_shared_layers" and v:
            out.append(f"KV cache shared by the last {v} layers")
        elif k == "activation_sparsity" and isinstance(v, list):
            idx = [i for i, x in enumerate(v) if x]
            if idx:
                out.append(f"activation sparsity in layers {index_ranges(idx)}")
        elif isinstance(v, (int, float, str)) and not isinstance(v, bool):
            out.append(f"{k.replace('_', ' ')} {v}")
        elif v is True:
            out.append(k.replace("_", " "))
    return out
