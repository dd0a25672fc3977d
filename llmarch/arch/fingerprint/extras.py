"""Extras: MTP, tied embeddings, embedding scale, soft-cap, per-layer embeddings, AltUp/LAuReL, linear-attention state."""

from __future__ import annotations

import math

from llmarch.arch.fingerprint.facts import Facts
from llmarch.arch.recipe_schema import Recipe
from llmarch.arch.spec import AltUpSpec, ArchSpec, LinearAttentionSpec
from llmarch.arch.tensor_roles import is_vision, output_head_name
from llmarch.checkpoint.base import Checkpoint
from llmarch.checkpoint.config_check import MAX_COUNT, is_int, show
from llmarch.errors import CheckpointError, LlmarchError


def read_extras(spec: ArchSpec, f: Facts, recipe: Recipe, ckpt: Checkpoint) -> None:
    spec.mtp_layers = int(
        f.get(
            "num_nextn_predict_layers",
            "mtp_num_layers",
            "num_mtp_layers",
            "mtp_num_hidden_layers",
            default=0,
            fact="mtp_layers",
        )
        or 0
    )
    tie = f.get("tie_word_embeddings", fact="tied_embeddings")
    has_head = output_head_name(ckpt.tensors, spec.vocab_size, spec.hidden_size) is not None
    spec.tied_embeddings = not has_head if ckpt.tensors else bool(tie if tie is not None else True)
    if tie is False and not has_head and ckpt.tensors:
        spec.warnings.append("config says tie_word_embeddings=false but there is no lm_head tensor")
    if recipe.embedding_scale == "sqrt_hidden" and spec.hidden_size:
        spec.embedding_scale = math.sqrt(spec.hidden_size)
    spec.final_softcap = f.get("final_logit_softcapping")
    ple_dim = f.get("hidden_size_per_layer_input", fact="per_layer_embeddings")
    if ple_dim:
        spec.per_layer_embeddings = {
            "dim": ple_dim,
            "vocab": f.get("vocab_size_per_layer_input", default=spec.vocab_size),
        }
    for key, name in (
        ("altup_num_inputs", "altup_streams"),
        ("laurel_rank", "laurel_rank"),
        ("activation_sparsity_pattern", "activation_sparsity"),
    ):
        v = f.get(key)
        if v:
            spec.extras[name] = v
    _layer_mixing(spec, f, ckpt)
    if spec.ffn_bias is False:
        spec.ffn_bias = bool(f.get("mlp_bias")) or recipe.ffn_bias
    spec.ffn_gated = recipe.ffn_gated
    la = spec.schedule and [l for l in spec.schedule if l.mixer in ("linear", "mamba")]
    if la:
        spec.linear_attention = _linear_state(spec, f, recipe, ckpt.path)
        if spec.linear is not None and spec.linear.kind == "gated_deltanet":
            spec.linear.projection = spec.linear_attention["projection"] = _linear_projection(spec, ckpt)


def _layer_mixing(spec: ArchSpec, f: Facts, ckpt: Checkpoint) -> None:
    """AltUp streams, LAuReL rank, per-layer FFN widths and activation sparsity, layer scalars:
    from the config, checked against the tensors that carry them."""
    has_tensors = bool(ckpt.tensors)

    names = "\n".join(ckpt.tensors) + "\n"

    def text_tensor(*fragments: str) -> bool:
        """A non-vision tensor whose name + newline holds one of `fragments` (a trailing newline
        matches a name's end). One C-speed search over all names first: a checkpoint may hold
        ~100k of them; the vision pattern runs only where that finds something."""
        if not any(fr in names for fr in fragments):
            return False
        return any(any(fr in n + "\n" for fr in fragments) and not is_vision(n) for n in ckpt.tensors)

    streams = f.get("altup_num_inputs", fact="altup")
    # HF names them layers.N.altup.*, llama.cpp blk.N.altup_*
    if streams and int(streams) > 1 and (not has_tensors or text_tensor(".altup.", ".altup_")):
        spec.altup = AltUpSpec(
            streams=int(streams),
            active=int(f.get("altup_active_idx", default=0)),
            correct_scale=bool(f.get("altup_correct_scale", default=True)),
        )
    rank = f.get("laurel_rank", fact="laurel_rank")
    if rank and (not has_tensors or text_tensor(".laurel.", ".laurel_")):
        spec.laurel_rank = int(rank)
    # HF layers.N.layer_scalar, llama.cpp blk.N.layer_output_scale.weight
    spec.layer_scalar = text_tensor(".layer_scalar\n", ".layer_output_scale.weight\n")
    widths = spec.extras.get("intermediate_size_per_layer")
    sparsity = f.get("activation_sparsity_pattern", fact="activation_sparsity")
    for layer in spec.schedule:
        i = layer.index
        if isinstance(widths, list) and i < len(widths) and widths[i] != spec.intermediate_size:
            layer.ffn_width = int(widths[i])
        elif not has_tensors and layer.kv_shared_from is not None and f.get("use_double_wide_mlp"):
            layer.ffn_width = 2 * int(spec.intermediate_size or 0)  # Gemma 4: KV-shared layers' FFN twice as wide
        if isinstance(sparsity, list) and i < len(sparsity) and sparsity[i]:
            s = float(sparsity[i])
            if not 0.0 < s < 1.0:
                raise LlmarchError(f"activation_sparsity_pattern[{i}] = {s} is not in (0, 1)", ckpt.path)
            layer.ffn_sparsity = s


def _linear_state(spec: ArchSpec, f: Facts, recipe: Recipe, path) -> dict:
    kinds = [l.linear_kind for l in spec.schedule if l.linear_kind]
    kind = kinds[0] if kinds else recipe.linear_kind or "linear"
    out = {"kind": kind, "linear": sum(l.mixer in ("linear", "mamba") for l in spec.schedule)}
    kh = f.get("linear_num_key_heads")
    vh = f.get("linear_num_value_heads")
    kd = f.get("linear_key_head_dim")
    vd = f.get("linear_value_head_dim")
    if vh and kd and vd:  # Gated DeltaNet: a kd x vd state per value head, plus the conv window
        lin = spec.linear = LinearAttentionSpec(
            kind=kind,
            key_heads=int(kh or vh),
            value_heads=int(vh),
            key_head_dim=int(kd),
            value_head_dim=int(vd),
            conv_kernel=int(f.get("linear_conv_kernel_dim", default=4, fact="linear_attention.conv_kernel")),
            norm_eps=recipe.linear_norm_eps,
        )
        neg = f.get(
            "linear_allow_neg_eigval", default=recipe.linear_allow_neg_eigval, fact="linear_attention.beta_scale"
        )
        if not isinstance(neg, bool):
            raise CheckpointError(f"linear_allow_neg_eigval must be true or false, got {show(neg)}", path)
        lin.beta_scale = 2.0 if neg else 1.0
        out["state_elems_per_layer"] = lin.recurrent_state_elems + lin.conv_state_elems
        out.update(
            key_heads=lin.key_heads,
            value_heads=lin.value_heads,
            key_head_dim=lin.key_head_dim,
            value_head_dim=lin.value_head_dim,
            conv_kernel=lin.conv_kernel,
        )
    elif isinstance(f.get("linear_attn_config"), dict) and f.get("linear_attn_config").get("num_heads"):
        # Kimi Delta Attention: a head_dim x head_dim state per head, plus q/k/v short convolutions
        c = f.get("linear_attn_config")

        def size(key: str, default: int) -> int:
            v = c.get(key, default)
            if not (is_int(v) and 1 <= v <= MAX_COUNT):
                raise CheckpointError(
                    f"linear_attn_config.{key} must be an integer from 1 to {MAX_COUNT}, got {show(v)}", path
                )
            return int(v)

        h, d = size("num_heads", 32), size("head_dim", 128)
        lin = spec.linear = LinearAttentionSpec(
            kind=kind,
            key_heads=h,
            value_heads=h,
            key_head_dim=d,
            value_head_dim=d,
            conv_kernel=size("short_conv_kernel_size", 4),
        )
        out["state_elems_per_layer"] = lin.recurrent_state_elems + lin.conv_state_elems
    elif kind == "short_conv" and f.get("conv_L_cache") is not None:
        # gated short convolution (LFM2/3): a window of the last L_cache - 1 inputs, hidden_size
        # channels; as linear attention: no keys, one value head of hidden_size, no recurrent matrix
        kernel = f.get("conv_L_cache", fact="linear_attention.conv_kernel")
        if not (is_int(kernel) and 1 <= kernel <= MAX_COUNT):
            raise CheckpointError(f"conv_L_cache must be an integer from 1 to {MAX_COUNT}, got {show(kernel)}", path)
        lin = spec.linear = LinearAttentionSpec(
            kind=kind, value_heads=1, value_head_dim=spec.hidden_size, conv_kernel=int(kernel), conv_activation=None
        )
        out["state_elems_per_layer"] = lin.conv_state_elems
        out["conv_kernel"] = lin.conv_kernel
    elif f.get("mamba_num_heads") and f.get("mamba_head_dim") and f.get("ssm_state_size"):
        # Mamba-2 as linear attention: B/C per group (key heads, state size wide), x per head
        # (value heads, head_dim wide); the conv window runs over [x B C]
        def count(key: str, default: int | None = None) -> int:
            v = f.get(key, default=default, fact="linear_attention")
            if not (is_int(v) and 1 <= v <= MAX_COUNT):
                raise CheckpointError(f"{key} must be an integer from 1 to {MAX_COUNT}, got {show(v)}", path)
            return int(v)

        dt_min = f.get("time_step_min", default=0.0)
        if not isinstance(dt_min, (int, float)) or isinstance(dt_min, bool) or not 0.0 <= dt_min < math.inf:
            raise CheckpointError(f"time_step_min must be a finite number >= 0, got {show(dt_min)}", path)
        lin = spec.linear = LinearAttentionSpec(
            kind=kind,
            key_heads=count("n_groups", 1),
            value_heads=count("mamba_num_heads"),
            key_head_dim=count("ssm_state_size"),
            value_head_dim=count("mamba_head_dim"),
            conv_kernel=count("conv_kernel", 4),
            dt_min=float(dt_min),
            conv_activation=_conv_activation(f, path),
        )
        out["state_elems_per_layer"] = lin.recurrent_state_elems + lin.conv_state_elems
        out.update(
            heads=lin.value_heads,
            head_dim=lin.value_head_dim,
            groups=lin.key_heads,
            state_size=lin.key_head_dim,
            conv_kernel=lin.conv_kernel,
            conv_activation=lin.conv_activation,
        )
    return out


def _conv_activation(f: Facts, path) -> str:
    """Mamba-2's activation after its causal conv: mamba_hidden_act (transformers' default silu;
    Nemotron-H's hidden_act is its MLP's, not this). run refuses the ones it does not implement."""
    act = f.get("mamba_hidden_act", default="silu", fact="linear_attention.conv_activation")
    if not isinstance(act, str) or not act:
        raise CheckpointError(f"mamba_hidden_act must be an activation name, got {show(act)}", path)
    return act


def _linear_projection(spec: ArchSpec, ckpt: Checkpoint) -> str | None:
    """How a Gated DeltaNet layer's input projections are stored, from the tensor names."""
    for name in ckpt.tensors:
        if name.endswith("linear_attn.q_proj.weight"):
            spec.evidence["linear_attention.projection"] = name
            return "separate"
        if name.endswith("linear_attn.in_proj_qkvz.weight"):
            spec.evidence["linear_attention.projection"] = name
            return "grouped"
        if name.endswith("linear_attn.in_proj_qkv.weight"):
            spec.evidence["linear_attention.projection"] = name
            return "split"
        if ckpt.format == "gguf" and name.endswith((".ssm_in.weight", ".attn_qkv.weight")):
            # qwen3next keeps HF's fused in_proj_ba as ssm_ba and in_proj_qkvz as ssm_in (llmarch's
            # converter) or split into attn_qkv + attn_gate (llama.cpp's, read back regrouped);
            # qwen35 has the split in_proj_qkv and separate b / a
            spec.evidence["linear_attention.projection"] = name
            fused_ba = any(n.endswith(".ssm_ba.weight") for n in ckpt.tensors)
            return "grouped" if name.endswith(".ssm_in.weight") or fused_ba else "split"
    return None
