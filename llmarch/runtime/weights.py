"""Where each weight of the runtime model lives in a checkpoint, read lazily.

The runtime names its weights canonically (`embed`, `layers.3.attn.q.weight`, `layers.3.ffn_norm.weight`,
...). A WeightSource answers get(canonical name) -> float tensor in PyTorch Linear layout [out, in]:
safetensors through a copy-on-write memory map (no read until a tensor is asked for), GGUF through
gguf-py's TENSOR_NAMES table plus the layout fixes llama.cpp's converter applied (Q/K RoPE row
permutation for llama-family files, Gemma norms stored as 1 + w).
"""

from __future__ import annotations

import re

import torch

from llmarch.arch.spec import ArchSpec
from llmarch.arch.tensor_roles import layer_of
from llmarch.checkpoint.base import Checkpoint, TensorInfo
from llmarch.errors import LlmarchError
from llmarch.qk_permute import from_gguf_order
from llmarch.runtime.mapped import file_bytes

# canonical leaf -> HF suffix within a decoder layer (Llama layout; most families)
HF_LAYER = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "attn.sinks": "self_attn.sinks",
    "attn.gate": "self_attn.gate_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
    # a dense MLP beside routed experts, and the norms around each (Gemma 4's MoE layers)
    "mlp.dense.gate": "mlp.gate_proj",
    "mlp.dense.up": "mlp.up_proj",
    "mlp.dense.down": "mlp.down_proj",
    "mlp.dense_post_norm": "post_feedforward_layernorm_1",
    "mlp.moe_norm": "pre_feedforward_layernorm_2",
    "mlp.moe_post_norm": "post_feedforward_layernorm_2",
    # AltUp, LAuReL, per-layer inputs, layer scalar (Gemma 3n / Gemma 4)
    "altup.router_norm": "altup.router_norm",
    "altup.router": "altup.modality_router",
    "altup.predict_coefs": "altup.prediction_coefs",
    "altup.correct_coefs": "altup.correction_coefs",
    "altup.correct_output_scale": "altup.correct_output_scale",
    "laurel.left": "laurel.linear_left",
    "laurel.right": "laurel.linear_right",
    "laurel.norm": "laurel.post_laurel_norm",
    "per_layer.gate": "per_layer_input_gate",
    "per_layer.projection": "per_layer_projection",
    "per_layer.norm": "post_per_layer_input_norm",
    "layer_scalar": "layer_scalar",
}
# canonical model-level stems -> HF names beside embed_tokens (a trailing .N index carries over)
HF_GLOBAL = {
    "per_layer_inputs.rows": "embed_tokens_per_layer",
    "per_layer_inputs.model_projection": "per_layer_model_projection",
    "per_layer_inputs.projection_norm": "per_layer_projection_norm",
    "altup_streams.up": "altup_projections",
    "altup_streams.down": "altup_unembed_projections",
}
# other names some checkpoints use for the same tensor (MiMo-V2-Flash's Hub files and transformers'
# save_pretrained name its sinks attention_sink_bias; OLMo-core's names for a pre-norm layer's norms,
# which Olmo hybrid's Hub files keep for its linear-attention layers)
HF_ALIASES = {
    "self_attn.sinks": "self_attn.attention_sink_bias",
    "self_attn.gate_proj": "self_attn.g_proj",
    "input_layernorm": "attention_layer_norm",
    "post_attention_layernorm": "feedforward_layer_norm",
    # LFM2's attention names
    "self_attn.o_proj": "self_attn.out_proj",
    "self_attn.q_norm": "self_attn.q_layernorm",
    "self_attn.k_norm": "self_attn.k_layernorm",
}
# the HF name of each norm slot depends on where the family puts its norms
HF_NORMS = {
    "pre": {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
    "sandwich": {
        "attn_norm": "input_layernorm",
        "attn_post_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "ffn_post_norm": "post_feedforward_layernorm",
    },
    "post": {"attn_post_norm": "post_attention_layernorm", "ffn_post_norm": "post_feedforward_layernorm"},
}
# LFM2 / LFM3: norms named by the operator (attention or short conv), MLP w1 / w3 / w2 (gate / up / down)
LFM_NORMS = {
    "attn_norm": "operator_norm",
    "attn_post_norm": "post_operator_norm",
    "ffn_norm": "ffn_norm",
    "ffn_post_norm": "post_ffn_norm",
}
LFM_MLP = {"mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
# GPT-2's own names (Conv1D weights are stored [in, out]; c_attn holds q, k, v fused)
GPT2_LAYER = {
    "attn_norm": "ln_1",
    "ffn_norm": "ln_2",
    "attn.qkv": "attn.c_attn",
    "attn.o": "attn.c_proj",
    "mlp.up": "mlp.c_fc",
    "mlp.down": "mlp.c_proj",
}
GPT2_CONV1D = ("attn.qkv", "attn.o", "mlp.up", "mlp.down")

LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+?)\.(weight|bias)$")
BARE = ("attn.sinks", "altup.correct_output_scale", "layer_scalar")  # Hub names these without a .weight suffix
BARE_RE = re.compile(r"^layers\.(\d+)\.(" + "|".join(re.escape(b) for b in BARE) + r")$")


def split_name(name: str) -> tuple[int | None, str, str]:
    m = LAYER_RE.match(name)
    if m:
        return int(m[1]), m[2], m[3]
    m = BARE_RE.match(name)  # bare per-layer parameters (gpt-oss attn.sinks): GGUF calls them .weight
    if m:
        return int(m[1]), m[2], "weight"
    stem, _, kind = name.rpartition(".")
    return None, stem, kind


class WeightSource:
    def __init__(self, ckpt: Checkpoint, spec: ArchSpec):
        self.ckpt, self.spec = ckpt, spec

    def name_of(self, name: str) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo | None:
        n = self.name_of(name)
        return self.ckpt.tensors.get(n) if n else None

    def get(self, name: str) -> torch.Tensor | None:
        t = self.info(name)
        if t is None:
            return self._fused(name)
        return self.fix(name, self.read(t))

    def read(self, t: TensorInfo) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor stored row-major (embeddings), read alone."""
        t = self.info(name)
        row = t.nbytes // t.shape[0]
        part = TensorInfo(
            t.name, t.dtype, (stop - start, *t.shape[1:]), t.file, t.offset + start * row, (stop - start) * row
        )
        return self.fix(name, self.read(part))

    def fix(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def _fused(self, name: str) -> torch.Tensor | None:
        """q / k / v from a fused qkv tensor (GPT-2, some GGUF archs)."""
        layer, stem, kind = split_name(name)
        if layer is None or stem not in ("attn.q", "attn.k", "attn.v"):
            return None
        fused_name = f"layers.{layer}.attn.qkv.{kind}"
        t = self.info(fused_name)
        if t is None:
            return None
        full = self.fix(fused_name, self.read(t))
        a = self.spec.attention
        kv = self.spec.layer_kv_heads(layer)
        sizes = [a.heads * a.head_dim, kv * a.head_dim, kv * (a.v_head_dim or a.head_dim)]
        if full.shape[0] != sum(sizes):
            raise LlmarchError(
                f"fused qkv tensor {t.name} has {full.shape[0]} rows, the spec needs {sum(sizes)}", t.file
            )
        q, k, v = torch.split(full, sizes, dim=0)
        return {"attn.q": q, "attn.k": k, "attn.v": v}[stem]


_memmap = file_bytes


def _raw(t: TensorInfo) -> torch.Tensor:
    return torch.from_numpy(_memmap(t.file)[t.offset : t.offset + t.nbytes])


ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class SafetensorsSource(WeightSource):
    def __init__(self, ckpt: Checkpoint, spec: ArchSpec):
        super().__init__(ckpt, spec)
        names = ckpt.tensors
        # GPT-2's own layout (transformer.h.N, fused c_attn, Conv1D weights): its embedding is wte
        self.gpt2 = any(n.endswith("wte.weight") for n in names)
        embed = next(
            (
                n
                for n in names
                if n.endswith(("embed_tokens.weight", "wte.weight")) and "vision" not in n and "per_layer" not in n
            ),
            None,
        )
        if embed is None:  # Nemotron-H: backbone.embeddings
            embed = next((n for n in names if n.endswith(".embeddings.weight") and layer_of(n) is None), None)
        if embed is None:
            raise LlmarchError("no token embedding tensor (embed_tokens / wte) in the checkpoint", ckpt.path)
        self.embed = embed
        self.prefix = embed[: embed.rfind(".", 0, len(embed) - len(".weight")) + 1]
        # lm_head sits beside the decoder: "lm_head.weight" or "language_model.lm_head.weight"
        heads = [n for n in names if n.endswith("lm_head.weight")]
        if not heads and "head.weight" in names:  # DeepSeek's own name (V4 as transformers saves it)
            heads = ["head.weight"]
        self.head = min(heads, key=len) if heads else None
        self.norms = HF_NORMS.get(spec.norm.placement, HF_NORMS["pre"])
        if any(".pre_mlp_layernorm." in n for n in names):  # AfMoE's sandwich FFN norm names
            self.norms = dict(self.norms, ffn_norm="pre_mlp_layernorm", ffn_post_norm="post_mlp_layernorm")
        self.lfm = any(".operator_norm." in n for n in names)  # LFM2 / LFM3 name their norms by the operator
        if self.lfm:
            self.norms = LFM_NORMS
        # Llama 4 names its dense FFN feed_forward.*, not mlp.*
        # (only decoder-layer names count: Pixtral's vision tower also has feed_forward.*)
        decoder = self.prefix + "layers."
        if any(n.startswith(decoder) and n.endswith(".attn_norm.weight") for n in names):  # DeepSeek's own names
            self.norms = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}
        self.mlp = "feed_forward." if any(n.startswith(decoder) and ".feed_forward." in n for n in names) else "mlp."
        # Kimi Linear keeps its dense-first layers' FFN under block_sparse_moe.* beside its MoE layers
        if any(n.startswith(decoder) and ".block_sparse_moe.up_proj." in n for n in names):
            self.mlp = "block_sparse_moe."
        # one sub-block per layer (Nemotron-H): attention or MLP projections under mixer.*, and the
        # layer's one pre-norm under norm, whichever part the layer has
        self.single_op = any(n.startswith(decoder) and ".mixer." in n for n in names)
        if self.single_op:
            self.mlp = "mixer."
            self.norms = {"attn_norm": "norm", "ffn_norm": "norm"}
        # the final norm: norm, Nemotron-H's norm_f, LFM's embedding_norm (applied after the last layer)
        self.final_norm = next((n for n in ("norm_f", "embedding_norm") if f"{self.prefix}{n}.weight" in names), "norm")

    def name_of(self, name: str) -> str | None:
        p = self.prefix
        layer, stem, kind = split_name(name)
        if self.gpt2:
            if layer is not None:
                hf = GPT2_LAYER.get(stem)
                return f"{p}h.{layer}.{hf}.{kind}" if hf else None
            return {
                "embed": f"{p}wte.weight",
                "pos_embed": f"{p}wpe.weight",
                "final_norm": f"{p}ln_f.{kind}",
                "lm_head": self.head,
            }.get(stem)
        if layer is not None:
            hf = HF_LAYER.get(stem) or self._layer_norms(layer).get(stem)
            if hf and hf.startswith("mlp.") and self.lfm:
                hf = LFM_MLP.get(hf, hf)
            if hf and hf.startswith("mlp."):
                hf = self.mlp + hf[4:]
            elif hf and self.single_op and hf.startswith("self_attn."):
                hf = "mixer." + hf[len("self_attn.") :]
            if not hf:
                return None
            suffix = "" if stem in BARE else f".{kind}"
            n = f"{p}layers.{layer}.{hf}{suffix}"
            if n not in self.ckpt.tensors and hf in HF_ALIASES:
                n = f"{p}layers.{layer}.{HF_ALIASES[hf]}{suffix}"
            return n
        base, _, index = stem.rpartition(".")
        if stem in HF_GLOBAL or (index.isdigit() and base in HF_GLOBAL):
            hf = HF_GLOBAL[stem] if stem in HF_GLOBAL else f"{HF_GLOBAL[base]}.{index}"
            return f"{p}{hf}.{kind}"
        return {
            "embed": self.embed,
            "final_norm": f"{p}{self.final_norm}.{kind}",
            "lm_head": self.head,
        }.get(stem)

    def _layer_norms(self, layer: int) -> dict[str, str]:
        """The norm names of one layer: the model's, unless its norms sit otherwise (Olmo hybrid)."""
        own = self.spec.schedule[layer].norm_placement if layer < len(self.spec.schedule) else None
        return HF_NORMS[own] if own in HF_NORMS and not self.lfm and not self.single_op else self.norms

    def read(self, t: TensorInfo) -> torch.Tensor:
        if t.dtype not in ST_DTYPES:
            raise LlmarchError(f"tensor {t.name} has dtype {t.dtype}, which llmarch run cannot load", t.file)
        raw = _raw(t)
        return raw.view(ST_DTYPES[t.dtype]).reshape(t.shape)

    def fix(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.gpt2 and split_name(name)[1] in GPT2_CONV1D and x.ndim == 2:
            return x.t()  # Conv1D [in, out] -> Linear [out, in]
        return x


class GGUFSource(WeightSource):
    def __init__(self, ckpt: Checkpoint, spec: ArchSpec):
        super().__init__(ckpt, spec)
        from llmarch.runtime.gguf_names import GGUFNames

        n = GGUFNames(ckpt.metadata["general.architecture"], spec)
        self.arch, self.permute_qk, self.globals, self.layer = n.arch, n.permute_qk, n.globals, n.layer
        self.k_b, self.v_b, self.stacked = n.k_b, n.v_b, n.stacked

    def name_of(self, name: str) -> str | None:
        layer, stem, kind = split_name(name)
        if layer is not None:
            t = self.layer.get(stem)
            return f"{t.format(bid=layer)}.{kind}" if t else None
        base = self.globals.get(stem)
        return f"{base}.{kind}" if base else None

    def get(self, name: str) -> torch.Tensor | None:
        layer, stem, kind = split_name(name)
        base, _, index = stem.rpartition(".")
        if layer is None and index.isdigit() and base in self.stacked:
            t = self.ckpt.tensors.get(f"{self.stacked[base]}.{kind}")
            if t is None or len(t.shape) != 3 or int(index) >= t.shape[0]:
                return None
            return self.read(t)[int(index)]
        if layer is not None and stem == "attn.kv_b" and self.info(name) is None:
            return self._kv_b(layer, kind)
        return super().get(name)

    def _kv_b(self, layer: int, kind: str) -> torch.Tensor:
        """MLA's kv_b [H * (nope + v), rank] from llama.cpp's split attn_k_b [H, rank, nope] and
        attn_v_b [H, v, rank] (the absorbed layout its deepseek2 converter writes)."""
        from llmarch.convert.from_gguf import _merge_kv_b

        names = [f"{n.format(bid=layer)}.{kind}" for n in (self.k_b, self.v_b)]
        k_b, v_b = (self.ckpt.tensors.get(n) for n in names)
        missing = [n for n, t in zip(names, (k_b, v_b)) if t is None]
        if k_b is None or v_b is None:
            raise LlmarchError(
                f"MLA layer {layer}: {' and '.join(missing)} missing (kv_b is stored as attn_k_b + attn_v_b)",
                self.ckpt.path,
            )
        a = self.spec.attention
        want = {
            k_b.name: (a.heads, a.kv_lora_rank, a.qk_nope_head_dim),
            v_b.name: (a.heads, a.v_head_dim, a.kv_lora_rank),
        }
        for t in (k_b, v_b):
            if tuple(t.shape) != want[t.name]:
                raise LlmarchError(f"tensor {t.name} has shape {tuple(t.shape)}, the spec needs {want[t.name]}", t.file)
        return torch.from_numpy(_merge_kv_b(self.read(k_b).numpy(), self.read(v_b).numpy()))

    def read(self, t: TensorInfo) -> torch.Tensor:
        from llmarch.runtime.quant import dequantize

        return dequantize(_raw(t), t.dtype, t.shape)

    def fix(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer, stem, kind = split_name(name)
        a = self.spec.attention
        if self.permute_qk and stem in ("attn.q", "attn.k"):
            x = from_gguf_order(x, a.heads if stem == "attn.q" else self.spec.layer_kv_heads(layer))
        if self.spec.norm.unit_offset and stem.endswith("norm") and kind == "weight":
            x = x - 1.0  # llama.cpp's Gemma converter stored (1 + w); the runtime adds the 1 itself
        return x


class GGUFAsHFSource(SafetensorsSource):
    """A GGUF read through convert's GGUF -> HF view (HF names, llama.cpp's re-layouts undone), for
    models whose mixers read HF names that the GGUF table above does not give (linear attention)."""

    def __init__(self, ckpt: Checkpoint, spec: ArchSpec):
        from llmarch.convert.from_gguf import HFView

        super().__init__(HFView(ckpt, spec), spec)

    def read(self, t: TensorInfo) -> torch.Tensor:
        return torch.from_numpy(self.ckpt.array(t.name))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[start:stop]


def open_weights(ckpt: Checkpoint, spec: ArchSpec) -> WeightSource:
    if ckpt.format == "gguf":
        return GGUFAsHFSource(ckpt, spec) if spec.linear_attention else GGUFSource(ckpt, spec)
    renames = spec.recipe.tensor_renames if spec.recipe is not None else None
    return SafetensorsSource(renamed(ckpt, renames) if renames else ckpt, spec)


def renamed(ckpt: Checkpoint, renames) -> Checkpoint:
    """The checkpoint with its tensor names rewritten as the family's recipe says (tensor_renames:
    regex -> replacement, applied in order), where its Hub files keep the family's own names."""
    import dataclasses

    rules = [(re.compile(pattern), replacement) for pattern, replacement in renames.items()]
    tensors: dict[str, TensorInfo] = {}
    for name, info in ckpt.tensors.items():
        new = name
        for pattern, replacement in rules:
            new = pattern.sub(replacement, new)
        if new in tensors:
            raise LlmarchError(f"tensors {tensors[new].name} and {name} both read as {new}", ckpt.path)
        tensors[new] = info
    return dataclasses.replace(ckpt, tensors=tensors)
