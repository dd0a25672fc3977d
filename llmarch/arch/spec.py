"""ArchSpec: the format-independent description of a model, and the figures derived from it.

One spec, four consumers (inspect, diff, run, convert): a fact any of them needs lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KV_DTYPE_BYTES = {
    "f32": 4,
    "float32": 4,
    "f16": 2,
    "float16": 2,
    "bf16": 2,
    "bfloat16": 2,
    "q8_0": 34 / 32,
    "fp8": 1,
    "f8": 1,
    "q4_0": 18 / 32,
}
STORAGE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


# the norm slots of a layer, by norm placement (the torch model's and the decode-plan builder's)
NORM_SLOTS = {
    "pre": ("attn_norm", "ffn_norm"),
    "post": ("attn_post_norm", "ffn_post_norm"),
    "sandwich": ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm"),
}


@dataclass
class LayerSpec:
    index: int
    mixer: str = "full"  # full | sliding | chunked | mla | linear | mamba | none (FFN-only layer)
    window: int | None = None  # sliding window or attention chunk size
    rope: bool = True  # False: NoPE layer
    ffn: str = "dense"  # dense | moe | none (mixer-only layer, Nemotron-H)
    rope_theta: float | None = None  # per-layer base where it differs (Gemma 3 local layers)
    rope_scaling: dict | None = None  # per-layer scaling where it differs (Olmo 3: global layers only)
    linear_kind: str | None = None  # gated_deltanet | kda | mamba2 (for mixer == linear/mamba)
    kv_shared_from: int | None = None  # reuses another layer's KV cache (Gemma 3n)
    # attends the keys an earlier layer's sparse-attention indexer selected (GLM-5's "shared"
    # indexer layers): no indexer, no indexer cache of its own
    index_from: int | None = None
    kv_heads: int | None = None  # where this layer's KV heads differ from the model's (MiMo-V2-Flash)
    sinks: bool | None = (
        None  # where this layer's attention sinks differ from the model's (MiMo-V2-Flash: sliding only)
    )
    rope_partial: float | None = None  # per-layer rotated fraction where it differs (per-layer-type rope_parameters)
    head_dim: int | None = None  # where this layer's head width differs from the model's (Gemma 4 global layers)
    v_from_k: bool = False  # values are the key projection itself, before k's norm and RoPE (Gemma 4 attention_k_eq_v)
    ffn_width: int | None = None  # where this layer's FFN width differs (per-layer lists, Gemma 4's double-wide MLP)
    # Gaussian top-k activation sparsity of the FFN gate (Gemma 3n): the target fraction of zeros;
    # the gate keeps relu(g - (mean(g) + std(g) * icdf_normal(sparsity)))
    ffn_sparsity: float | None = None
    # beside its window, the layer keeps one compressed KV entry (head_dim wide, used as key and
    # value) per compress_ratio tokens for the whole context (DeepSeek V4's compressed attention)
    compress_ratio: int | None = None
    # a lightning indexer keeps its own compressed key (index_head_dim) per compressed entry and
    # picks index_topk entries per query (DeepSeek V4's compressed sparse attention layers)
    compressed_index: bool = False
    kv_single: bool = False  # keys and values are one projection, cached once (DeepSeek V4's wkv)
    # where this layer's norms sit otherwise than the model's (Olmo hybrid: post-norm attention
    # layers between pre-norm linear-attention layers), from its norm tensors
    norm_placement: str | None = None

    def public(self) -> dict:
        out: dict[str, Any] = {"mixer": self.mixer, "window": self.window, "rope": self.rope, "ffn": self.ffn}
        if self.compress_ratio:
            out["compress_ratio"] = self.compress_ratio
            out["compressed_index"] = self.compressed_index
        if self.norm_placement:
            out["norm_placement"] = self.norm_placement
        return out


@dataclass
class AttentionSpec:
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    v_head_dim: int | None = None  # when V differs from K (MLA)
    qk_norm: str | None = None  # None | per_head | whole (one norm over the whole projection) | l2
    bias: bool = False  # q/k/v bias units
    out_bias: bool = False
    sinks: bool = False  # learned per-head sink logits (gpt-oss)
    gated: bool = False  # sigmoid output gate: o(attn * sigmoid(gate(x)))
    # where the gate's weights live: "separate" (its own projection: AfMoE's gate_proj, GGUF attn_gate)
    # | "in_q" (q_proj emits [q | gate] per head, Qwen3-Next); None when no tensor says (config only)
    gate_layout: str | None = None
    gate_per_head: bool = False  # one sigmoid gate per head (LFM3's g_proj: hidden -> heads), not one per channel
    indexer: bool = False  # DeepSeek Sparse Attention lightning indexer (V3.2, GLM-5)
    # the indexer's sizes: scoring heads, key width (one key per token, cached beside the latent),
    # keys each query attends (top-k), and whether its rope dims rotate interleaved pairs
    index_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    index_rope_interleave: bool | None = None
    q_lora_rank: int | None = None  # MLA
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    rope_interleave: bool | None = None  # MLA: the rope dims rotate interleaved pairs (DeepSeek's rope_interleave)
    scale: float | None = None  # softmax scale when not 1/sqrt(head_dim)
    v_norm: bool = False  # a weightless RMS norm over each value head (Gemma 3n / 4)
    softcap: float | None = None  # attention logit soft-capping (Gemma 2 style)
    value_scale: float | None = None  # constant multiplier on V after its projection (MiMo-V2-Flash)
    # queries scaled by log1p(floor((pos + position_offset) / floor_scale)) * attn_scale + 1:
    # {"floor_scale", "attn_scale", "position_offset", "all_layers"}, or None. Llama 4 scales its
    # NoPE layers only, offset 1; Mistral 4 every layer after RoPE, offset 0
    temperature_tuning: dict | None = None
    mla: bool = False
    # a NoPE MLA layer's rope dims join its nope dims: its kv_a emits no k_rot and caches none, its
    # query and kv_b heads are nope + rope wide (Mistral Large 4); else they stay, unrotated (Kimi Linear)
    nope_folds_rope: bool = False
    # learned per-head query scaling, q_h * (s_h * log(pos + 1) + b_h), on the attention's queries
    # and the sparse-attention indexer's (Mistral Large 4's softmax_scaling tensors)
    query_log_scale: bool = False
    latent_norm_eps: float | None = None  # MLA's latent norm epsilon where not transformers' 1e-6 default
    # grouped output projection (DeepSeek V4): heads split into out_groups groups, each projected to
    # out_rank on its own before one projection mixes the groups
    out_groups: int | None = None
    out_rank: int | None = None

    @property
    def kind(self) -> str:
        if self.mla:
            return "MLA"
        if self.kv_heads == self.heads:
            return "MHA"
        if self.kv_heads == 1:
            return "MQA"
        return "GQA"


@dataclass
class RopeSpec:
    theta: float | None = None
    scaling: dict | None = None  # {"type": "yarn", "factor": ..., ...}
    partial: float = 1.0  # fraction of head_dim rotated
    local_theta: float | None = None  # separate base for sliding layers (Gemma 3)
    learned_positions: bool = False  # GPT-2 style absolute position embeddings
    nope_layers: list[int] = field(default_factory=list)
    # inverse frequencies multiplied by exp(alpha), alpha a learned vector of one entry per rotated
    # pair (Mistral Large 4's LeRoPE: rotary_emb.alpha)
    learned_freq_scale: bool = False


@dataclass
class LinearAttentionSpec:
    """The linear/recurrent mixer's sizes (Gated DeltaNet): what run builds and caches, and what
    inspect counts as the fixed state of each such layer."""

    # gated_deltanet | kda | mamba2 | short_conv; a short convolution (LFM2 / LFM3) has no keys and
    # one value "head" of hidden_size channels: its conv window is its whole state, no recurrent matrix
    kind: str
    key_heads: int = 0
    value_heads: int = 0  # each key head serves value_heads / key_heads consecutive value heads
    key_head_dim: int = 0
    value_head_dim: int = 0
    conv_kernel: int = 4  # causal depthwise conv over [q | k | v]; the cache keeps its last kernel - 1 inputs
    # where the input projections' rows live: "grouped" (in_proj_qkvz + in_proj_ba, rows grouped per
    # key head: [q k v z] and [b a], Qwen3-Next) | "split" (in_proj_qkv, in_proj_z, in_proj_b,
    # in_proj_a, Qwen3.5) | "separate" (q_proj, k_proj, v_proj, g_proj, b_proj, a_proj with o_norm and
    # o_proj, Olmo hybrid); None when no tensor says (config only)
    projection: str | None = None
    # Mamba-2: the chunked form's lower bound on dt (time_step_min; its one-token update has none)
    dt_min: float = 0.0
    # Gated DeltaNet: beta = beta_scale * sigmoid(b); 2 lets the write's eigenvalues go negative
    # (Olmo hybrid's linear_allow_neg_eigval)
    beta_scale: float = 1.0
    # the gated output norm's epsilon where it is not the model's (Olmo hybrid: FLA's fixed 1e-5)
    norm_eps: float | None = None
    # the activation after Mamba-2's causal conv (its config's mamba_hidden_act); None: none (LFM's
    # short convolution). Gated DeltaNet and KDA apply the model's activation there.
    conv_activation: str | None = "silu"

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_heads * self.key_head_dim + self.value_heads * self.value_head_dim

    @property
    def conv_state_elems(self) -> int:
        return self.conv_channels * (self.conv_kernel - 1)

    @property
    def recurrent_state_elems(self) -> int:
        return self.value_heads * self.key_head_dim * self.value_head_dim


@dataclass
class MoESpec:
    experts: int
    experts_per_token: int
    shared_experts: int = 0
    expert_ffn: int | None = None  # width of one routed expert
    shared_ffn: int | None = None  # width of the shared expert(s), all together
    shared_gated: bool = False  # sigmoid gate on the shared expert (Qwen3-Next)
    router: str | None = None  # score function: softmax | sigmoid
    # top-k over the raw logits, then the score function over the k chosen (gpt-oss: softmax,
    # Llama 4: sigmoid); else scores over all experts, then top-k
    topk_before_score: bool = False
    norm_topk_prob: bool | None = None  # the k weights renormalised to sum 1
    n_group: int | None = None  # group-limited routing (DeepSeek V3): None or 1 when the groups limit nothing
    topk_group: int | None = None
    # how a group ranks for the group limit: the sum of its two best scores (DeepSeek V3) or its
    # best score alone (DeepSeek-V2's group_limited_greedy)
    group_score: str = "top2_sum"
    routed_scaling_factor: float | None = None  # the k weights multiplied by it
    # e_score_correction_bias (sigmoid scores: added for the choice only) / a logit bias (gpt-oss)
    router_bias: bool = False
    weights_on_input: bool = False  # router weights scale each expert's input, not its output (Llama 4)
    expert_bias: bool = False  # bias units on the routed experts (gpt-oss)
    norm_topk_eps: float = 1e-20  # sigmoid-then-top-k routers' w / (sum + eps)
    # clamped SwiGLU (gpt-oss): (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit);
    # None: the model's activation, gated
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
    fused_gate_up: str | None = None  # a fused gate_up_proj holds gate and up: interleaved (gpt-oss) | halves (Llama 4)
    # fused experts stored out-rows first, [E, 2I, d] / [E, d, I] (transformers' own Mistral 4 layout),
    # which decides the reading where the shape cannot (d == 2I, as in Mistral Small 4)
    fused_out_first: bool = False
    dense_beside: bool = False  # a dense MLP runs beside the routed experts in the same layer (Gemma 4's MoE layers)
    # the router reads rms_norm(x) * a learned vector * hidden^-0.5, not x (Gemma 4)
    router_input_scale: bool = False
    per_expert_scale: bool = False  # the routing weights multiplied by a learned per-expert scale (Gemma 4)
    # layers whose experts are picked by a fixed token-id -> expert-ids table, not by the scores
    # (DeepSeek V4's first layers); the scores still weigh the picked experts
    hash_layers: list[int] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)


@dataclass
class AltUpSpec:
    """Alternating updates (Gemma 3n): the hidden state is `streams` parallel copies; each layer
    predicts all of them from the active one by learned per-token coefficients, runs on the active
    stream only, then corrects every stream by the innovation (layer output - prediction)."""

    streams: int
    active: int = 0
    correct_scale: bool = True  # the corrected active stream is scaled by a learned vector before the per-layer gate


@dataclass
class HyperSpec:
    """Hyper-connections (DeepSeek V4's mHC): the residual is `streams` copies of the hidden state,
    collapsed into each sub-block's input and spread back by per-token weights, mixed by a matrix
    made doubly stochastic by `sinkhorn_iters` Sinkhorn-Knopp steps (floor `eps`)."""

    streams: int
    sinkhorn_iters: int = 20
    eps: float = 1e-6


@dataclass
class NormSpec:
    placement: str = "pre"  # pre | post | sandwich
    kind: str = "rms"  # rms | layer
    eps: float | None = None
    unit_offset: bool = False  # weight applied as (1 + w) (Gemma)


@dataclass
class ArchSpec:
    # the family: its recipe's name (one name for every model_type and GGUF arch the recipe lists),
    # else the model_type / GGUF arch as written when no recipe knows the model
    family: str
    format: str
    architecture: str | None = None  # transformers class or GGUF arch
    source: str | None = None  # the path the checkpoint was read from
    model_type: str | None = None  # config.json's model_type as written (None for GGUF)
    text_family: str | None = None  # model_type of the text part of a multimodal config
    gguf_arch: str | None = None  # the GGUF file's arch, or the one llama.cpp converts this family to
    supports: list[str] = field(default_factory=list)  # llmarch commands proven for the family: run, convert, from_gguf
    layers: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    context_length: int | None = None
    intermediate_size: int | None = None
    activation: str | None = None
    ffn_bias: bool = False
    ffn_gated: bool = True  # gated (GLU) FFN and experts: act(gate(x)) * up(x); False: act(up(x)) (GPT-2, Nemotron-H)
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    rope: RopeSpec = field(default_factory=RopeSpec)
    norm: NormSpec = field(default_factory=NormSpec)
    moe: MoESpec | None = None
    schedule: list[LayerSpec] = field(default_factory=list)
    linear_attention: dict | None = None  # kind and state sizes of the linear/recurrent layers
    linear: LinearAttentionSpec | None = None  # the Gated DeltaNet mixer's sizes (what run builds)
    mtp_layers: int = 0
    tied_embeddings: bool = False
    embedding_scale: float | None = None  # Gemma: sqrt(hidden)
    final_softcap: float | None = None
    per_layer_embeddings: dict | None = None  # Gemma 3n PLE: {"dim": ..., "params": ...}
    altup: AltUpSpec | None = None
    hyper: HyperSpec | None = None
    laurel_rank: int | None = None  # LAuReL: a low-rank residual beside attention (Gemma 3n)
    layer_scalar: bool = False  # each layer's output multiplied by a stored scalar (Gemma 4)
    extras: dict[str, Any] = field(default_factory=dict)  # AltUp, LAuReL, KV sharing, ...
    params: dict[str, int] = field(default_factory=dict)  # total, active, mtp, vision, embeddings, ...
    stored_bytes: int = 0
    # parameters and stored bytes by part: dense, routed_experts, embeddings, output_head, ple (the
    # per-layer embedding table alone), vision, mtp
    part_params: dict[str, int] = field(default_factory=dict)
    part_bytes: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)  # params per stored dtype / quant type
    kv_dtype_default: str = "bf16"
    evidence: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # normalised (text) config the spec came from
    # the family's recipe, resolved once by the fingerprint (not part of the JSON document)
    recipe: Any = field(default=None, repr=False, compare=False)

    # --- derived figures -------------------------------------------------------------------
    def layer_kv_heads(self, i: int) -> int:
        """KV heads of layer i: its own count where it has one (MiMo-V2-Flash), else the model's."""
        own = self.schedule[i].kv_heads if i < len(self.schedule) else None
        return own or self.attention.kv_heads

    def layer_kv_bytes_per_token(self, layer: LayerSpec, kv_bytes: float) -> float:
        """Cache bytes one token adds in one layer (before any window cap)."""
        a = self.attention
        if layer.mixer == "mla":  # the latent and shared k_rot, plus the indexer's key where it has one
            index_key = (a.index_head_dim or 0) if a.indexer and layer.index_from is None else 0
            if layer.kv_shared_from is not None:  # reads another layer's latent; its indexer keys are its own
                return index_key * kv_bytes
            rope = 0 if a.nope_folds_rope and not layer.rope else (a.qk_rope_head_dim or 0)
            return ((a.kv_lora_rank or 0) + rope + index_key) * kv_bytes
        if layer.kv_shared_from is not None or layer.mixer in ("linear", "mamba", "none"):
            return 0.0
        k_dim = layer.head_dim or a.head_dim
        v_dim = 0 if layer.kv_single else layer.head_dim or a.v_head_dim or a.head_dim
        return (layer.kv_heads or a.kv_heads) * (k_dim + v_dim) * kv_bytes

    def layer_compressed_entry_bytes(self, layer: LayerSpec, kv_bytes: float) -> float:
        """Cache bytes of one compressed entry (one per compress_ratio tokens): the entry, used as
        key and value, plus the indexer's compressed key where the layer has one."""
        if not layer.compress_ratio:
            return 0.0
        a = self.attention
        index_key = (a.index_head_dim or 0) if layer.compressed_index else 0
        return ((layer.kv_heads or a.kv_heads) * (layer.head_dim or a.head_dim) + index_key) * kv_bytes

    def kv_cache(self, context: int | None = None, kv_dtype: str | None = None) -> dict:
        kv_dtype = kv_dtype or self.kv_dtype_default
        b = KV_DTYPE_BYTES[kv_dtype]
        context = context or self.context_length or 4096
        per_token = 0.0
        total = 0.0
        all_layers = 0.0
        for layer in self.schedule:
            per = self.layer_kv_bytes_per_token(layer, b)
            per_token += per if layer.mixer not in ("sliding", "chunked") else 0.0
            tokens = min(context, layer.window) if layer.mixer in ("sliding", "chunked") and layer.window else context
            total += per * tokens
            all_layers += per
            if layer.compress_ratio:  # entries for every compress_ratio tokens seen, never evicted
                entry = self.layer_compressed_entry_bytes(layer, b)
                per_token += entry / layer.compress_ratio
                all_layers += entry / layer.compress_ratio
                total += entry * (context // layer.compress_ratio)
        return {
            "dtype": kv_dtype,
            "context": context,
            # bytes each further token adds once every window is full (sliding layers stop growing)
            "bytes_per_token": int(round(per_token)),
            # bytes a token adds while it is inside every window (all attention layers count)
            "bytes_per_token_all_layers": int(round(all_layers)),
            "bytes": int(round(total)),
            "state_bytes": self.recurrent_state_bytes(b),
        }

    def recurrent_state_bytes(self, b: float) -> int:
        """Fixed state of linear/recurrent layers, independent of context."""
        la = self.linear_attention
        if not la:
            return 0
        if self.linear is not None:
            # every layer with LinearAttentionSpec sizes: the recurrent matrix is kept in float32 (as
            # transformers and llama.cpp keep it), the conv window in the cache dtype
            lin = self.linear
            return int(la.get("linear", 0) * (lin.recurrent_state_elems * 4 + lin.conv_state_elems * b))
        per_layer = la.get("state_elems_per_layer") or 0
        return int(per_layer * la.get("linear", 0) * b)

    def ratios(self) -> dict:
        sched = self.schedule
        sliding = [l for l in sched if l.mixer == "sliding"]
        linear = [l for l in sched if l.mixer in ("linear", "mamba")]
        mixers = [l for l in sched if l.mixer != "none"]
        out: dict[str, Any] = {"sliding_window": None, "linear_attention": None}
        if sliding:
            windows = sorted({l.window for l in sliding if l.window})
            attention = [l for l in mixers if l.mixer not in ("linear", "mamba")]  # LFM3: conv layers are not global
            out["sliding_window"] = {
                "window": windows[0] if len(windows) == 1 else windows,
                "local": len(sliding),
                "global": len(attention) - len(sliding),
            }
        if linear:
            kinds = sorted({l.linear_kind or l.mixer for l in linear})
            out["linear_attention"] = {
                "kind": kinds[0] if len(kinds) == 1 else kinds,
                "linear": len(linear),
                "full": len(mixers) - len(linear),
            }
        return out
