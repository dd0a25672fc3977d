"""A GGUF's tensor names for llmarch's canonical weight names, from gguf-py's TENSOR_NAMES, and the
layout facts llama.cpp's converter applied, without torch: the torch loader (weights.GGUFSource)
and the torch-free decode-plan builder (plan_build.py) read the same table."""

from __future__ import annotations


class GGUFNames:
    """globals: model-level stem -> GGUF base name; layer: per-layer stem -> a name with {bid};
    stacked: HF lists stored as one 3-D tensor; k_b / v_b: MLA's split kv_b; permute_qk: the Q/K
    rows are in llama.cpp's RoPE order."""

    def __init__(self, arch_name: str, spec):
        import gguf

        self.arch = arch_name
        # llama.cpp's converter permuted Q/K rows for these families' RoPE (the spec's recipe says which)
        self.permute_qk = bool(spec.recipe and spec.recipe.gguf_permute_qk)
        T = gguf.MODEL_TENSOR
        names = gguf.TENSOR_NAMES
        self.globals = {
            "embed": names[T.TOKEN_EMBD],
            "pos_embed": names[T.POS_EMBD],
            "final_norm": names[T.OUTPUT_NORM],
            "lm_head": names[T.OUTPUT],
        }
        self.layer = {
            "attn_norm": T.ATTN_NORM,
            "attn_post_norm": T.ATTN_POST_NORM,
            "ffn_norm": T.FFN_NORM,
            "ffn_post_norm": T.FFN_POST_NORM,
            "attn.q": T.ATTN_Q,
            "attn.k": T.ATTN_K,
            "attn.v": T.ATTN_V,
            "attn.qkv": T.ATTN_QKV,
            "attn.o": T.ATTN_OUT,
            "attn.q_norm": T.ATTN_Q_NORM,
            "attn.k_norm": T.ATTN_K_NORM,
            "attn.sinks": T.ATTN_SINKS,
            "mlp.gate": T.FFN_GATE,
            "mlp.up": T.FFN_UP,
            "mlp.down": T.FFN_DOWN,
            "altup.router_norm": T.ALTUP_ROUTER_NORM,
            "altup.router": T.ALTUP_ROUTER,
            "altup.predict_coefs": T.ALTUP_PREDICT_COEF,
            "altup.correct_coefs": T.ALTUP_CORRECT_COEF,
            "altup.correct_output_scale": T.ALTUP_CORRECT_SCALE,
            "laurel.left": T.LAUREL_L,
            "laurel.right": T.LAUREL_R,
            "laurel.norm": T.LAUREL_POST_NORM,
            "per_layer.gate": T.PER_LAYER_INP_GATE,
            "per_layer.projection": T.PER_LAYER_PROJ,
            "per_layer.norm": T.PER_LAYER_POST_NORM,
            # a dense MLP beside the routed experts and the norms around each (Gemma 4's MoE layers)
            "mlp.dense.gate": T.FFN_GATE,
            "mlp.dense.up": T.FFN_UP,
            "mlp.dense.down": T.FFN_DOWN,
            "mlp.dense_post_norm": T.FFN_POST_NORM_1,
            "mlp.moe_norm": T.FFN_PRE_NORM_2,
            "mlp.moe_post_norm": T.FFN_POST_NORM_2,
            "layer_scalar": T.LAYER_OUT_SCALE,
            # MLA (deepseek2): q / kv low-rank projections; kv_b is rebuilt from k_b / v_b (see _kv_b)
            "attn.q_a": T.ATTN_Q_A,
            "attn.q_a_norm": T.ATTN_Q_A_NORM,
            "attn.q_b": T.ATTN_Q_B,
            "attn.kv_a": T.ATTN_KV_A_MQA,
            "attn.kv_a_norm": T.ATTN_KV_A_NORM,
            "attn.kv_b": T.ATTN_KV_B,
            # DeepSeek Sparse Attention's lightning indexer (deepseek32, glm-dsa)
            "attn.indexer.wq_b": T.INDEXER_ATTN_Q_B,
            "attn.indexer.wk": T.INDEXER_ATTN_K,
            "attn.indexer.k_norm": T.INDEXER_K_NORM,
            "attn.indexer.weights_proj": T.INDEXER_PROJ,
        }
        self.layer = {k: names[v] for k, v in self.layer.items()}
        self.k_b, self.v_b = names[T.ATTN_K_B], names[T.ATTN_V_B]
        self.globals.update(
            {
                "per_layer_inputs.rows": names[T.PER_LAYER_TOKEN_EMBD],
                "per_layer_inputs.model_projection": names[T.PER_LAYER_MODEL_PROJ],
                "per_layer_inputs.projection_norm": names[T.PER_LAYER_PROJ_NORM],
            }
        )
        # HF's numbered lists that llama.cpp stacks into one 3-D tensor (Gemma 3n's AltUp projections)
        self.stacked = {"altup_streams.up": names[T.ALTUP_PROJ], "altup_streams.down": names[T.ALTUP_UNEMBD_PROJ]}
        # pre-norm archs without an ffn_norm in gguf-py's table (glm4moe, gpt-oss) store the FFN's
        # pre-norm as post_attention_norm
        arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
        known = gguf.MODEL_TENSORS.get(arch, ())
        if spec.norm.placement == "pre" and T.FFN_NORM not in known and T.ATTN_POST_NORM in known:
            self.layer["ffn_norm"] = names[T.ATTN_POST_NORM]

    def layer_name(self, layer: int, stem: str, kind: str = "weight") -> str | None:
        t = self.layer.get(stem)
        return f"{t.format(bid=layer)}.{kind}" if t else None
