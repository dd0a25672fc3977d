"""Mixture of experts: expert counts and widths, how the router scores and weighs, how the experts
compute and are stored, shared experts, and which layers are MoE."""

from __future__ import annotations

from llmarch.arch.fingerprint.facts import EXPERTS_KEYS, SHARED_KEYS, TOPK_KEYS, Facts, any_layer_has, layer_has
from llmarch.arch.ranges import index_ranges
from llmarch.arch.recipe_schema import MoERecipe, Recipe
from llmarch.arch.spec import ArchSpec, LayerSpec, MoESpec
from llmarch.arch.tensor_roles import has_role


def read_moe(spec: ArchSpec, f: Facts, recipe: Recipe, lt) -> None:
    experts = f.get(*EXPERTS_KEYS, fact="moe.experts") or 0
    routed_layers = [i for i in sorted(lt) if layer_has(lt, i, "routed_expert") or layer_has(lt, i, "router")]
    if not experts and not routed_layers:
        return
    topk = f.get(*TOPK_KEYS, fact="moe.experts_per_token") or 0
    shared = f.get(*SHARED_KEYS, fact="moe.shared_experts")
    shared_ffn = f.get("shared_expert_intermediate_size", fact="moe.shared_ffn")
    has_shared_tensor = any_layer_has(lt, "shared_expert")
    if shared is None:
        shared = 1 if (shared_ffn or has_shared_tensor or recipe.moe.shared_experts) else 0
    if lt and bool(shared) != bool(has_shared_tensor):
        spec.warnings.append(
            f"config says {shared} shared experts, tensors {'show' if has_shared_tensor else 'show none'}"
        )
        shared = shared if has_shared_tensor else 0
    if has_shared_tensor:
        spec.evidence["moe.shared_experts"] = has_shared_tensor
    # the recipe names the HF key (Llama 4: intermediate_size); GGUF configs are already canonical
    key = "moe_intermediate_size" if spec.format == "gguf" else recipe.moe.expert_ffn_key
    expert_ffn = f.get(key, "moe_intermediate_size", "expert_intermediate_size", fact="moe.expert_ffn")
    if shared and not shared_ffn:
        shared_ffn = (expert_ffn or 0) * int(shared)
    m = MoESpec(
        experts=int(experts),
        experts_per_token=int(topk),
        shared_experts=int(shared or 0),
        expert_ffn=expert_ffn,
        shared_ffn=shared_ffn,
    )
    m.shared_gated = bool(any_layer_has(lt, "shared_expert_gate"))
    _read_routing(m, f, recipe.moe, lt)
    _read_experts(m, f, recipe.moe, lt)
    spec.moe = m


def _read_routing(m: MoESpec, f: Facts, r: MoERecipe, lt) -> None:
    m.router = f.get("scoring_func", default=r.router, fact="moe.router")
    m.topk_before_score = r.topk_before_score
    # Kimi Linear's config says moe_renormalize (transformers maps it to norm_topk_prob)
    if r.reads_norm_topk_prob:
        m.norm_topk_prob = f.get(
            "norm_topk_prob", "moe_renormalize", default=r.norm_topk_prob, fact="moe.norm_topk_prob"
        )
    else:
        m.norm_topk_prob = r.norm_topk_prob
    m.norm_topk_eps = r.norm_topk_eps
    m.n_group = f.get("n_group")
    m.topk_group = f.get("topk_group")
    m.group_score = r.group_score
    # DeepSeek-V2 limits by group only under topk_method "group_limited_greedy"; "greedy" ignores n_group
    if r.grouped_topk_method is not None and f.get("topk_method", fact="moe.n_group") != r.grouped_topk_method:
        m.n_group = m.topk_group = None
    m.routed_scaling_factor = f.get("routed_scaling_factor", "route_scale", fact="moe.routed_scaling_factor")
    m.router_bias = bool(any_layer_has(lt, "router_bias"))
    names = [n for ns in lt.values() for n in ns]
    # HF router.scale / router.per_expert_scale; llama.cpp ffn_gate_inp.scale / ffn_down_exps.scale
    m.router_input_scale = any(n.endswith(("router.scale", ".ffn_gate_inp.scale")) for n in names)
    m.per_expert_scale = any(n.endswith(("router.per_expert_scale", ".ffn_down_exps.scale")) for n in names)
    m.weights_on_input = r.weights_on_input
    m.hash_layers = _hash_routed_layers(f, lt)


def _hash_routed_layers(f: Facts, lt) -> list[int]:
    """Layers that pick their experts by token id: a token-id -> expert-ids table in the layer's
    tensors, else the config's per-layer MLP kind ("hash_moe")."""
    if lt:
        return [i for i in sorted(lt) if layer_has(lt, i, "hash_router")]
    kinds = f.get("mlp_layer_types")
    return [i for i, v in enumerate(kinds) if v == "hash_moe"] if isinstance(kinds, list) else []


def _read_experts(m: MoESpec, f: Facts, r: MoERecipe, lt) -> None:
    names = [n for ns in lt.values() for n in ns if has_role(n, "routed_expert")]
    m.expert_bias = any(n.endswith("bias") for n in names)
    if r.swiglu_limit is not None:  # transformers reads both from the config; the recipe has its defaults
        m.swiglu_limit = float(f.get("swiglu_limit", default=r.swiglu_limit, fact="moe.swiglu_limit"))
        alpha = f.get("swiglu_alpha", default=r.swiglu_alpha, fact="moe.swiglu_alpha")
        m.swiglu_alpha = None if alpha is None else float(alpha)  # None: a plain clamp (DeepSeek V4)
    # the gate/up order inside a fused gate_up_proj is not in the file: the recipe says it, for
    # checkpoints whose tensors are fused (or when there are no tensors to look at)
    if not lt or any(n.endswith(("experts.gate_up_proj", "experts.gate_up_proj_blocks")) for n in names):
        m.fused_gate_up = r.fused_gate_up
        m.fused_out_first = r.fused_out_first
    # a layer holding routed experts and a dense MLP of its own (Gemma 4: enable_moe_block)
    dense = ("mlp.gate_proj.weight", "mlp.up_proj.weight", ".ffn_gate.weight", ".ffn_up.weight")  # HF, GGUF
    m.dense_beside = (
        any(layer_has(lt, i, "routed_expert") and any(n.endswith(dense) for n in ns) for i, ns in lt.items())
        if lt
        else bool(f.get("enable_moe_block", fact="moe.dense_beside"))
    )


def assign_ffn(spec: ArchSpec, f: Facts, recipe: Recipe, lt, sched: list[LayerSpec]) -> None:
    if not spec.moe:
        return
    n = len(sched)
    from_config = _moe_layers_from_config(f, n)
    from_tensors = {i for i in range(n) if layer_has(lt, i, "routed_expert") or layer_has(lt, i, "router")}
    if lt:
        moe_layers = from_tensors
        if from_config is not None and from_config != from_tensors:
            spec.warnings.append(
                f"config puts MoE in layers {index_ranges(sorted(from_config))}, tensors in {index_ranges(sorted(from_tensors))}"
            )
        spec.evidence["moe.dense_layers"] = "layers without expert/router tensors"
    else:
        moe_layers = from_config if from_config is not None else set(range(n))
    for layer in sched:
        if layer.ffn != "none":  # single-op mixer layers (Nemotron-H) have no FFN at all
            layer.ffn = "moe" if layer.index in moe_layers else "dense"


def _moe_layers_from_config(f: Facts, n: int) -> set[int] | None:
    """Which layers are MoE according to the config keys each family uses."""
    explicit = f.get("moe_layers")
    if isinstance(explicit, list):
        return {i for i in explicit if isinstance(i, int)}
    k = f.get("first_k_dense_replace", "num_dense_layers", "first_k_dense")
    freq = f.get("moe_layer_freq")
    if k is not None:
        step = freq if isinstance(freq, int) and freq > 0 else 1
        return {i for i in range(n) if i >= k and i % step == 0}
    if isinstance(freq, list):
        return {i for i, v in enumerate(freq) if v}
    # MiMo-V2-Flash: "dense" | "sparse" per layer; DeepSeek V4: "hash_moe" (experts picked by token
    # id) | "moe"
    mlp_types = f.get("mlp_layer_types")
    if isinstance(mlp_types, list):
        return {i for i, v in enumerate(mlp_types) if v in ("sparse", "moe", "hash_moe")}
    step = f.get("interleave_moe_layer_step")
    if step:
        return set(range(step - 1, n, step))
    sparse_step = f.get("decoder_sparse_step")
    only = f.get("mlp_only_layers")
    if sparse_step is not None or only is not None:
        only = set(only or [])
        sparse_step = sparse_step or 1
        return {i for i in range(n) if i not in only and (i + 1) % sparse_step == 0}
    return None
