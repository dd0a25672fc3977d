"""The rich fact sheet of `llmarch inspect`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from llmarch.arch.ranges import index_ranges, layers_named
from llmarch.report.text import count, nbytes, plain


def fact_rows(doc: dict) -> list[tuple[str, str, str]]:
    """(section, fact, value) rows; shared with `llmarch diff`."""
    a, r, n, f, kv = doc["attention"], doc["rope"], doc["norm"], doc["ffn"], doc["kv_cache"]
    p = doc["params"]
    rows = [
        ("identity", "family", doc["family"]),
    ]
    if doc.get("model_type") and (doc["model_type"] != doc["family"] or doc.get("text_family")):
        text = f" (text: {doc['text_family']})" if doc.get("text_family") else ""
        rows.append(("identity", "model_type", doc["model_type"] + text))
    rows += [
        ("identity", "architecture", str(doc.get("architecture") or "-")),
        ("identity", "llmarch supports", ", ".join(doc.get("supports") or []) or "inspect only"),
        ("size", "layers", str(doc["layers"])),
        ("size", "hidden size", str(doc["hidden_size"])),
        ("size", "vocab", str(doc["vocab_size"])),
        ("size", "context", str(doc.get("context_length") or "-")),
        ("size", "params total", count(p.get("total"))),
        ("size", "params active / token", count(p.get("active"))),
    ]
    if p.get("active_without_input_embedding") != p.get("active"):
        rows.append(("size", "  without input embedding", count(p.get("active_without_input_embedding"))))
    if p.get("active_non_embedding") is not None:
        rows.append(("size", "  non-embedding", count(p.get("active_non_embedding"))))
    if p.get("mtp"):
        rows.append(("size", "params in MTP layers", count(p["mtp"])))
    if p.get("vision"):
        rows.append(("size", "params in vision/audio towers", count(p["vision"])))
    heads = f"{a['heads']} q / {a['kv_heads']} kv × {a['head_dim']}"
    if a.get("v_head_dim"):
        heads += f" (v {a['v_head_dim']})"
    rows += [
        ("attention", "kind", a["kind"]),
        ("attention", "heads", heads),
    ]
    if a.get("mla"):
        m = a["mla"]
        rows.append(
            (
                "attention",
                "MLA ranks",
                f"q {m['q_lora_rank'] or 'full'}, kv {m['kv_lora_rank']}, "
                f"rope {m['qk_rope_head_dim']} + nope {m['qk_nope_head_dim']}",
            )
        )
    rows += [
        ("attention", "QK-norm", a["qk_norm"] or "no"),
        ("attention", "bias units", "q/k/v" + (" + out" if a.get("out_bias") else "") if a["bias"] else "no"),
        ("attention", "sinks", "yes" if a["sinks"] else "no"),
        (
            "attention",
            "gated output",
            ("yes" + (" (rows of q_proj)" if a.get("gate_layout") == "in_q" else "")) if a.get("gated") else "no",
        ),
        ("attention", "sparse indexer", "yes" if a.get("indexer") else "no"),
    ]
    if a.get("softcap"):
        rows.append(("attention", "logit soft-cap", str(a["softcap"])))
    if a.get("temperature_tuning"):
        t = a["temperature_tuning"]
        rows.append(
            (
                "attention",
                "q temperature" if t.get("all_layers") else "NoPE q temperature",
                f"floor_scale {t['floor_scale']}, attn_scale {t['attn_scale']}",
            )
        )
    sw, la = doc["sliding_window"], doc["linear_attention"]
    rows += [
        ("schedule", "pattern", doc["schedule_pattern"]),
        ("schedule", "sliding local:global", f"{sw['local']}:{sw['global']} @ {sw['window']}" if sw else "none"),
        ("schedule", "linear:full", f"{la['linear']}:{la['full']} ({la['kind']})" if la else "none"),
        ("positions", "RoPE theta", _theta(r)),
        ("positions", "RoPE scaling", r["scaling"]["type"] + _factor(r["scaling"]) if r.get("scaling") else "none"),
        ("positions", "partial RoPE", f"{r['partial']:.3g}" if r["partial"] != 1 else "no"),
        ("positions", "NoPE layers", index_ranges(r["nope_layers"]) if r["nope_layers"] else "none"),
    ]
    if r.get("learned_positions"):
        rows.append(("positions", "learned positions", "yes"))
    if r.get("chunked"):
        rows.append(("positions", "chunked attention", str(r["chunked"])))
    if r.get("compressed"):  # layers with compressed KV rotate by their own base and scaling
        c = r["compressed"]
        scaling = c["scaling"]["type"] + _factor(c["scaling"]) if c.get("scaling") else "no scaling"
        rows.append(("positions", "compressed layers' RoPE", f"theta {c['theta']:g}, {scaling}"))
    moe = doc["moe"]
    # the config's dense FFN width, shown only where some layer has a dense FFN (an all-MoE model's
    # config may still carry intermediate_size, a width no layer of it has)
    has_dense = any(layer.get("ffn") == "dense" for layer in doc.get("layer_schedule") or [])
    dense_width = f["intermediate_size"] if has_dense else None
    ffn_width = f"{dense_width} ({f['ratio']}×)" if dense_width and f["ratio"] else "-"
    if moe and not has_dense:
        ffn_width = "none (every layer's FFN is MoE)"
    if moe:
        shared = f"{moe['shared_experts']}" + (f" (width {moe['shared_ffn']})" if moe.get("shared_ffn") else "")
        if moe.get("shared_gated"):
            shared += ", gated"
        rows += [
            ("MoE", "experts", f"{moe['experts']} routed, {moe['experts_per_token']} per token"),
            ("MoE", "shared experts", shared if moe["shared_experts"] else "none"),
            ("MoE", "expert width", str(moe["expert_ffn"]) + (f" (dense FFN {dense_width})" if dense_width else "")),
            ("MoE", "dense layers", layers_named(moe["dense_layers"]) if moe["dense_layers"] else "none"),
            ("MoE", "router", _router(moe)),
            ("MoE", "router weights scale", "expert input" if moe.get("weights_on_input") else "expert output"),
            ("MoE", "expert activation", _expert_activation(moe, f["activation"], f.get("gated", True))),
            ("MoE", "expert bias units", "yes" if moe.get("expert_bias") else "no"),
        ]
        if moe.get("fused_gate_up"):
            rows.append(("MoE", "fused gate/up", moe["fused_gate_up"]))
    # layers whose norms sit otherwise than the model's (Olmo hybrid's post-norm attention layers)
    own: dict[str, list[int]] = {}
    for i, layer in enumerate(doc.get("layer_schedule") or []):
        if layer.get("norm_placement"):
            own.setdefault(layer["norm_placement"], []).append(i)
    placement = n["placement"] + "".join(f"; {p} on layers {index_ranges(ix)}" for p, ix in sorted(own.items()))
    rows += [
        ("norms", "placement", placement),
        (
            "norms",
            "kind",
            ("RMSNorm" if n["kind"] == "rms" else "LayerNorm") + (" (1+w)" if n.get("unit_offset") else ""),
        ),
        ("FFN", "activation", str(f["activation"] or "-") + (", gated" if f.get("gated", True) else ", not gated")),
        ("FFN", "intermediate / hidden", ffn_width),
        ("extras", "MTP layers", str(doc["mtp_layers"])),
        ("extras", "tied embeddings", "yes" if doc["tied_embeddings"] else "no"),
    ]
    ple = doc.get("per_layer_embeddings")
    if ple:
        rows.append(
            (
                "extras",
                "per-layer embeddings",
                f"{count(ple.get('params'))} params ({ple.get('share', 0):.0%} of total), dim {ple['dim']}",
            )
        )
    out_proj, hyper = doc["attention"].get("out_proj"), doc.get("hyper_connections")
    if out_proj:  # heads in groups, each group projected on its own before one mixing projection
        rows.append(("extras", "grouped output projection", f"{out_proj['groups']} groups, rank {out_proj['rank']}"))
    if hyper:
        rows.append(
            ("extras", "hyper-connections", f"{hyper['streams']} streams, {hyper['sinkhorn_iters']} Sinkhorn steps")
        )
    for k, v in (doc.get("extras") or {}).items():
        if k != "intermediate_size_per_layer":
            rows.append(("extras", k.replace("_", " "), str(v)))
    st = doc["storage"]
    rows += [
        (
            "memory",
            "stored",
            f"{nbytes(st['bytes'])} in " + ", ".join(f"{k} {count(v)}" for k, v in list(st["dtypes"].items())[:6]),
        ),
        (
            "memory",
            f"KV cache ({kv['dtype']})",
            f"{nbytes(kv['bytes_per_token'])}/token, {nbytes(kv['bytes'])} at {kv['context']} tokens",
        ),
    ]
    if kv.get("state_bytes"):
        rows.append(("memory", "recurrent state", nbytes(kv["state_bytes"])))
    return rows


def _router(moe: dict) -> str:
    score = moe.get("router") or "?"
    text = f"top-k logits, then {score} over the k" if moe.get("topk_before_score") else f"{score}, then top-k"
    text += " + bias" if moe.get("router_bias") else ""
    text += f", groups {moe['topk_group']}/{moe['n_group']}" if moe.get("n_group") else ""
    text += " ranked by their best score" if moe.get("n_group") and moe.get("group_score") == "max" else ""
    text += ", renormalised" if moe.get("norm_topk_prob") else ""
    scale = moe.get("routed_scaling_factor")
    text += f", ×{scale:g}" if scale not in (None, 1, 1.0) else ""
    if moe.get("hash_layers"):  # the scores weigh the experts, a token-id table picks them
        text += f"; experts picked by token id in layers {index_ranges(moe['hash_layers'])}"
    return text


def _expert_activation(moe: dict, activation, gated: bool) -> str:
    if moe.get("swiglu_limit") is not None and moe.get("swiglu_alpha") is None:
        return f"{activation or '-'}, gated, gate and up clamped at {moe['swiglu_limit']:g}"
    if moe.get("swiglu_limit") is not None:
        return f"clamped SwiGLU (alpha {moe['swiglu_alpha']:g}, limit {moe['swiglu_limit']:g})"
    return f"{activation or '-'}" + (", gated" if gated else ", not gated")


def _theta(r: dict) -> str:
    if r["theta"] is None:
        return "-"
    s = f"{r['theta']:g}"
    return s + (f" (local {r['local_theta']:g})" if r.get("local_theta") else "")


def _factor(s: dict) -> str:
    return f" ×{s['factor']:g}" if s.get("factor") else ""


def print_fact_sheet(doc: dict, console: Console) -> None:
    table = Table(title=plain(f"{doc.get('source') or ''}  [{doc['format']}]"), show_header=True, header_style="bold")
    table.add_column("section", style="dim")
    table.add_column("fact")
    table.add_column("value")
    last = None
    for section, fact, value in fact_rows(doc):
        table.add_row(section if section != last else "", plain(fact), plain(value))  # "[mla moe] ×58" is not markup
        last = section
    console.print(table)
    for w in doc["warnings"]:
        console.print(plain("warning: ", "yellow") + plain(w))
