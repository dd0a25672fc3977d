"""Attention facts: heads, head widths, MLA ranks, QK-norm, bias units, sinks, gate, indexer, scales,
query temperature tuning (Llama 4's NoPE layers, Mistral 4's every layer)."""

from __future__ import annotations

from llmarch.arch.fingerprint.facts import Facts, any_layer_has
from llmarch.arch.recipe_schema import Recipe
from llmarch.arch.spec import ArchSpec, AttentionSpec
from llmarch.arch.tensor_roles import has_role
from llmarch.checkpoint.base import Checkpoint
from llmarch.errors import CheckpointError

# learned per-head log-position query scaling (transformers' softmax_scaling; Mistral's own ssmax_scaling)
QUERY_LOG_SCALE = ("softmax_scaling.scale", "ssmax_scaling.s")


def read_attention(spec: ArchSpec, f: Facts, recipe: Recipe, lt, ckpt: Checkpoint) -> None:
    a = AttentionSpec()
    a.heads = int(f.get("num_attention_heads", "n_head", "num_heads", "n_heads", default=0, fact="attention.heads"))
    a.kv_heads = int(
        f.get(
            "num_key_value_heads",
            "num_kv_heads",
            "n_kv_heads",
            "multi_query_group_num",
            default=a.heads,
            fact="attention.kv_heads",
        )
        or a.heads
    )
    a.kv_lora_rank = f.get("kv_lora_rank", fact="attention.kv_lora_rank")
    a.q_lora_rank = f.get("q_lora_rank", fact="attention.q_lora_rank")
    a.mla = bool(a.kv_lora_rank) or recipe.attention == "mla"
    if a.mla:
        a.qk_rope_head_dim = f.get("qk_rope_head_dim", fact="attention.qk_rope_head_dim")
        a.qk_nope_head_dim = f.get("qk_nope_head_dim", fact="attention.qk_nope_head_dim")
        a.v_head_dim = f.get("v_head_dim", fact="attention.v_head_dim")
        a.rope_interleave = bool(f.get("rope_interleave", default=True))  # transformers' MLA configs default True
        if a.qk_nope_head_dim is None and f.get("head_dim") and a.qk_rope_head_dim:
            a.qk_nope_head_dim = f.get("head_dim") - a.qk_rope_head_dim  # GGUF key_length = nope + rope
        a.head_dim = (a.qk_nope_head_dim or 0) + (a.qk_rope_head_dim or 0)
        a.kv_heads = a.heads  # MLA expands the latent to every head
        kv_a = any_layer_has(lt, "mla_kv_a")
        if kv_a:
            spec.evidence["attention.kind"] = kv_a
        a.nope_folds_rope = recipe.nope_folds_rope
        if recipe.latent_norm_model_eps:
            a.latent_norm_eps = f.get("rms_norm_eps", fact="attention.latent_norm_eps")
        scaled = next((n for names in lt.values() for n in names if n.endswith(QUERY_LOG_SCALE)), None)
        if scaled:
            a.query_log_scale = True
            spec.evidence["attention.query_log_scale"] = scaled
    else:
        hd = f.get("head_dim", "attention_head_dim", "kv_channels", fact="attention.head_dim")
        if hd is None and a.heads:
            hd = spec.hidden_size // a.heads
            spec.evidence["attention.head_dim"] = "hidden_size / heads"
        a.head_dim = int(hd or 0)
        v = f.get("v_head_dim")
        a.v_head_dim = v if v and v != a.head_dim else None

    # QK-norm: the tensor's width tells per-head (head_dim) from whole-projection (heads*head_dim)
    qn = any_layer_has(lt, "q_norm")
    qk_recipe = recipe.qk_norm
    if qn:
        width = ckpt.tensors[qn].shape[-1] if ckpt.tensors[qn].shape else 0
        a.qk_norm = "per_head" if width < a.heads * max(a.head_dim, 1) or a.heads == 1 else "whole"
        spec.evidence["attention.qk_norm"] = qn
    elif qk_recipe == "l2" and f.get("use_qk_norm", fact="attention.qk_norm"):
        a.qk_norm = "l2"  # Llama 4: a weightless L2 norm, visible only in the config
    elif qk_recipe and not lt:
        a.qk_norm = qk_recipe
        spec.evidence["attention.qk_norm"] = f"recipe {recipe.family}"
    elif f.get("use_qk_norm") and qk_recipe != "l2":
        spec.warnings.append("config sets use_qk_norm but no q_norm tensor exists")

    bias_t = any_layer_has(lt, "qkv_bias")
    a.bias = bool(bias_t) if lt else bool(f.get("attention_bias", "qkv_bias", "bias", default=False))
    if bias_t:
        spec.evidence["attention.bias"] = bias_t
    elif f.get("attention_bias") and lt:
        spec.warnings.append("config sets attention_bias but no q/k/v bias tensor exists")
    a.out_bias = bool(any_layer_has(lt, "out_bias"))
    sinks = any_layer_has(lt, "sinks")
    a.sinks = bool(sinks) or bool(recipe.sinks and not lt)
    if sinks:
        spec.evidence["attention.sinks"] = sinks
    # an attn_gate on a linear-attention layer is that mixer's output gate (llama.cpp's qwen35 names
    # Gated DeltaNet's in_proj_z so), not attention's
    attn_layers = {k: v for k, v in lt.items() if not any(has_role(n, "linear_attn") for n in v)}
    gate = any_layer_has(attn_layers, "attn_gate")
    a.gated = bool(gate) or bool(
        f.get("attn_output_gate", "use_attn_gate", "gated_attention", default=recipe.gated_attention)
    )
    q = any_layer_has(lt, "q_proj")
    if gate:
        a.gate_layout = "separate"
        spec.evidence["attention.gated"] = gate
        rows = ckpt.tensors[gate].shape[0] if ckpt.tensors[gate].shape else 0
        a.gate_per_head = bool(a.heads) and rows == a.heads and a.head_dim > 1
    elif q and not a.mla and a.heads and ckpt.tensors[q].shape and ckpt.tensors[q].shape[0] == 2 * a.heads * a.head_dim:
        # q_proj twice the query width holds [q | gate] per head (Qwen3-Next, Qwen3.5), whatever the config says
        a.gated, a.gate_layout = True, "in_q"
        spec.evidence["attention.gated"] = q
    idx = any_layer_has(lt, "indexer")
    a.indexer = bool(idx) or bool(f.get("index_topk", "index_n_heads"))
    if idx:
        spec.evidence["attention.indexer"] = idx
    if a.indexer:
        read_indexer(spec, a, f, recipe, lt, ckpt)
    # Gemma 3 configs carry attn_logit_softcapping but its attention never applies it (recipe says so)
    a.softcap = f.get("attn_logit_softcapping") if recipe.attn_softcap else None
    scalar = f.get("query_pre_attn_scalar")
    if scalar:
        a.scale = float(scalar) ** -0.5
    elif recipe.attention_scale is not None:
        a.scale = float(recipe.attention_scale)
        spec.evidence["attention.scale"] = f"recipe {recipe.family}"
    a.v_norm = recipe.v_norm
    # MiMo-V2-Flash scales V; transformers' default applies when the key is absent, an explicit null means 1
    key = "attention_value_scale"
    vs = f.config[key] if key in f.config else recipe.attention_value_scale
    if vs is not None and float(vs) != 1.0:
        a.value_scale = float(vs)
        spec.evidence["attention.value_scale"] = f.cite(key) if key in f.config else f"recipe {recipe.family}"
    # Llama 4's NoPE layers: a query temperature growing with the position; floor_scale and
    # attn_scale default as in Llama4TextConfig, the config class that defines these keys
    if f.get("attn_temperature_tuning", fact="attention.temperature_tuning"):
        a.temperature_tuning = {
            "floor_scale": f.get("floor_scale", default=8192),
            "attn_scale": f.get("attn_scale", default=0.1),
            "position_offset": 1,
            "all_layers": False,
        }
    _read_rope_temperature(spec, a, f, ckpt)
    spec.attention = a


def _read_rope_temperature(spec: ArchSpec, a: AttentionSpec, f: Facts, ckpt: Checkpoint) -> None:
    """Mistral 4's rope_parameters.llama_4_scaling_beta: every layer's query (after RoPE) times
    1 + beta * log(1 + floor(pos / original_max_position_embeddings)), as get_llama_4_attn_scale."""
    params = f.get("rope_parameters")
    beta = params.get("llama_4_scaling_beta") if isinstance(params, dict) else None
    if beta is None:
        return
    original = params.get("original_max_position_embeddings")
    if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
        raise CheckpointError(
            "rope_parameters.llama_4_scaling_beta needs a positive integer "
            f"original_max_position_embeddings, got {original!r}",
            ckpt.path / "config.json" if ckpt.config is not None and ckpt.path.is_dir() else ckpt.path,
        )
    a.temperature_tuning = {
        "floor_scale": original,
        "attn_scale": float(beta),
        "position_offset": 0,
        "all_layers": True,
    }
    spec.evidence["attention.temperature_tuning"] = f.cite("rope_parameters", ".llama_4_scaling_beta")


# the indexer's projections (under self_attn.indexer., in GGUF blk.N.indexer.) and the shape each
# must have, from (index heads, index key width, q_lora_rank, hidden size); without a query
# low-rank the indexer's queries come from the hidden state (transformers' MistralLarge4TextIndexer)
INDEXER_SHAPES = {
    "wq_b.weight": lambda h, d, q, hid: (h * d, q or hid),
    "wk.weight": lambda h, d, q, hid: (d, hid),
    "weights_proj.weight": lambda h, d, q, hid: (h, hid),
}
INDEXER_SHAPES.update(
    {
        "indexer.attn_q_b.weight": INDEXER_SHAPES["wq_b.weight"],
        "indexer.attn_k.weight": INDEXER_SHAPES["wk.weight"],
        "indexer.proj.weight": INDEXER_SHAPES["weights_proj.weight"],
    }
)


def read_indexer(spec: ArchSpec, a: AttentionSpec, f: Facts, recipe: Recipe, lt, ckpt: Checkpoint) -> None:
    """The lightning indexer's sizes: from the config, else from its tensors (wk's rows are the key
    width, weights_proj's the scoring heads); every layer's indexer tensors must agree with them."""
    found = {suffix: n for names in lt.values() for n in names for suffix in INDEXER_SHAPES if n.endswith(suffix)}
    heads = f.get("index_n_heads", fact="attention.index_heads")
    dim = f.get("index_head_dim", fact="attention.index_head_dim")
    if heads is None and "weights_proj.weight" in found:
        heads = ckpt.tensors[found["weights_proj.weight"]].shape[0]
        spec.evidence["attention.index_heads"] = found["weights_proj.weight"]
    if dim is None and "wk.weight" in found:
        dim = ckpt.tensors[found["wk.weight"]].shape[0]
        spec.evidence["attention.index_head_dim"] = found["wk.weight"]
    a.index_heads, a.index_head_dim = heads, dim
    a.index_topk = f.get("index_topk", fact="attention.index_topk")
    where = ckpt.path / "config.json" if ckpt.config is not None and ckpt.path.is_dir() else ckpt.path
    if a.index_topk is not None and a.index_topk < 1:
        raise CheckpointError(f"index_topk is {a.index_topk}: the sparse-attention indexer keeps at least 1 key", where)
    if dim is not None and a.qk_rope_head_dim and dim < a.qk_rope_head_dim:
        raise CheckpointError(
            f"index_head_dim {dim} is narrower than the {a.qk_rope_head_dim} rope dims the indexer rotates", where
        )
    if recipe.indexer_rope:
        a.index_rope_interleave = recipe.indexer_rope == "interleaved"
        spec.evidence["attention.index_rope_interleave"] = f"recipe {recipe.family}"
    if heads is None or dim is None:
        return
    for names in lt.values():
        for n in names:
            for suffix, shape in INDEXER_SHAPES.items():
                want = shape(heads, dim, a.q_lora_rank or 0, spec.hidden_size)
                t = ckpt.tensors[n]
                if n.endswith(suffix) and has_role(n, "indexer") and tuple(t.shape) != want:
                    raise CheckpointError(
                        f"indexer tensor {n} has shape {list(t.shape)}; index_n_heads {heads}, index_head_dim "
                        f"{dim}, q_lora_rank {a.q_lora_rank} and hidden_size {spec.hidden_size} give {list(want)}",
                        t.file,
                    )


def read_indexer_sharing(spec: ArchSpec, f: Facts, ckpt: Checkpoint) -> None:
    """Layers that reuse the previous indexer layer's top-k instead of running their own (GLM-5:
    indexer_types "full" | "shared" per layer, else transformers' rule from index_topk_freq and
    index_skip_topk_offset: layer i is full when max(i - offset + 1, 0) % freq == 0)."""
    if not spec.attention.indexer:
        return
    n = len(spec.schedule)
    types = f.get("indexer_types", fact="attention.indexer_types")
    freq = f.get("index_topk_freq", fact="attention.indexer_types")
    where = ckpt.path / "config.json" if ckpt.config is not None and ckpt.path.is_dir() else ckpt.path
    if types is None and freq is not None:
        offset = f.get("index_skip_topk_offset", default=2)
        types = ["full" if max(i - offset + 1, 0) % max(freq, 1) == 0 else "shared" for i in range(n)]
    if types is None:
        return
    if len(types) != n or any(t not in ("full", "shared") for t in types) or (n and types[0] != "full"):
        raise CheckpointError(
            f"indexer_types must give {n} layers, each full or shared, the first full; got {types!r:.120}", where
        )
    last = 0
    for layer, t in zip(spec.schedule, types, strict=True):
        if t == "full":
            last = layer.index
        else:
            layer.index_from = last
