"""A decoder assembled from the ArchSpec's per-layer schedule.

Each Block gets its mixer and FFN injected from registries keyed by LayerSpec.mixer / .ffn (MIXERS,
FFNS below): a new kind of layer is an entry there, not a new model file; what varies inside a kind
(output gate, sinks, QK-norm, temperature, ...) each op reads from the spec. The model is built on
the meta device; load_weights() then assigns tensors read lazily from the checkpoint (memory-mapped
safetensors are used in place when dtypes match).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.arch.spec import NORM_SLOTS, ArchSpec, LayerSpec
from llmarch.errors import LlmarchError
from llmarch.runtime import gemv_cuda
from llmarch.runtime.ops.altup import AltUp, AltUpStreams
from llmarch.runtime.ops.attention import Attention
from llmarch.runtime.ops.chunked_attention import ChunkedAttention
from llmarch.runtime.ops.compressed_attention import SharedKVAttention
from llmarch.runtime.ops.gated_deltanet import GatedDeltaNet
from llmarch.runtime.ops.hyper_connections import HyperConnection, HyperHead, load_params
from llmarch.runtime.ops.kda import KimiDeltaAttention
from llmarch.runtime.ops.laurel import Laurel
from llmarch.runtime.ops.learned_rope import LearnedRopeScale
from llmarch.runtime.ops.mamba2 import Mamba2
from llmarch.runtime.ops.mla import MLAttention
from llmarch.runtime.ops.mlp import GatedMLP, PlainMLP
from llmarch.runtime.ops.moe import moe_ffn
from llmarch.runtime.ops.norms import RMSNorm, make_norm
from llmarch.runtime.ops.per_layer_inputs import PerLayerGate, PerLayerInputs
from llmarch.runtime.ops.rope import Rope
from llmarch.runtime.ops.short_conv import ShortConv
from llmarch.runtime.rope_tables import rope_key as _rope_key


def dense_ffn(spec: ArchSpec, layer: LayerSpec) -> nn.Module:
    width = layer.ffn_width or spec.intermediate_size
    if not spec.ffn_gated:
        return PlainMLP(spec.hidden_size, width, spec.activation, bias=spec.ffn_bias)
    return GatedMLP(spec.hidden_size, width, spec.activation, bias=spec.ffn_bias, sparsity=layer.ffn_sparsity)


# mixer kind -> factory(spec, layer, rope) ; ffn kind -> factory(spec, layer). A linear/recurrent
# layer's kind is its linear_kind (gated_deltanet, kda, mamba2, short_conv), since one mixer name covers them all.
MIXERS: dict[str, Callable[..., nn.Module]] = {
    "full": Attention,
    "sliding": Attention,
    "chunked": ChunkedAttention,
    "mla": MLAttention,
    "shared_kv": SharedKVAttention,  # one K=V head, window + compressed entries (DeepSeek V4)
    "gated_deltanet": GatedDeltaNet,
    "kda": KimiDeltaAttention,
    "mamba2": Mamba2,
    "short_conv": ShortConv,
}
FFNS: dict[str, Callable[..., nn.Module]] = {"dense": dense_ffn, "moe": moe_ffn}


class Block(nn.Module):
    """x + [post](mixer([pre] x)), then the same around the FFN; absent norms are skipped.

    Optional parts, each from a spec fact: LAuReL beside the mixer (averaged with its residual),
    the layer's per-layer input gated into the residual, a stored output scalar, and AltUp (x is
    then the [n, B, T, d] streams: the body runs on the active stream's prediction, the correction
    updates every stream, and the per-layer input goes into streams 1.. as the reference adds it).
    """

    def __init__(self, spec: ArchSpec, layer: LayerSpec, mixer: nn.Module | None, ffn: nn.Module | None):
        super().__init__()
        # a layer with no mixer or no FFN (Nemotron-H's single-op layers) skips that part and its norms
        self.attn, self.mlp = mixer, ffn
        slots = NORM_SLOTS.get(layer.norm_placement or spec.norm.placement, NORM_SLOTS["pre"])
        if mixer is None:
            slots = tuple(s for s in slots if not s.startswith("attn_"))
        if ffn is None:
            slots = tuple(s for s in slots if not s.startswith("ffn_"))
        for slot in ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm"):
            norm = (
                make_norm(spec.norm.kind, spec.hidden_size, spec.norm.eps, spec.norm.unit_offset)
                if slot in slots
                else None
            )
            setattr(self, slot, norm)
        self.laurel = Laurel(spec) if spec.laurel_rank else None
        self.altup = AltUp(spec) if spec.altup else None
        self.per_layer = PerLayerGate(spec) if spec.per_layer_embeddings else None
        self.layer_scalar = nn.Parameter(torch.ones(1)) if spec.layer_scalar else None
        # hyper-connections: x is then [B, T, N, d], collapsed into each sub-block and spread back
        h = spec.hyper
        self.hyper = (
            nn.ModuleDict(
                {
                    part: LayerHyperConnection(spec.hidden_size, h, spec.norm.eps or 1e-6, layer.index, part)
                    for part in ("attn", "ffn")
                }
            )
            if h is not None
            else None
        )
        self.hashed = spec.moe is not None and layer.index in spec.moe.hash_layers
        # a plain pre-norm layer of RMS norms whose mixer and FFN each read their normed input by one
        # Linear (takes_prenorm) and end in one: a one-token CUDA step hands the norms to those GEMVs'
        # prologue and the residual adds to the output GEMVs' epilogue (forward's norm / residual);
        # read once here, so a compiled step's choice is guarded as a module attribute
        self.fused_norms = (
            gemv_cuda.fused_norm()
            and isinstance(self.attn_norm, RMSNorm)
            and isinstance(self.ffn_norm, RMSNorm)
            and self.attn_post_norm is None
            and self.ffn_post_norm is None
            and self.laurel is None
            and self.altup is None
            and self.per_layer is None
            and self.hyper is None
            and not self.hashed
            and getattr(mixer, "takes_prenorm", False)
            and getattr(ffn, "takes_prenorm", False)
        )

    def forward(self, x, pos, cache, per_layer_input=None, ids=None):
        if self.hyper is not None:
            x = self.hyper["attn"].around(x, lambda c: self.attn(self.attn_norm(c), pos, cache))
            return self.hyper["ffn"].around(x, lambda c: self._ffn(self.ffn_norm(c), ids))
        return self.add_per_layer_input(self.body(x, pos, cache, ids), per_layer_input)

    def body(self, x, pos, cache, ids=None):
        """The layer up to its per-layer input: mixer, LAuReL, FFN, AltUp's correction (then the
        streams are returned). Not for hyper-connection layers."""
        if self.fused_norms and x.shape[-2] == 1 and gemv_cuda.on_device(x):
            x = self.attn(x, pos, cache, norm=self.attn_norm, residual=x)
            return self.mlp(x, norm=self.ffn_norm, residual=x)
        streams = None
        if self.altup is not None:
            streams = self.altup.predict(x)
            x = streams[self.altup.active]
        if self.attn is not None:
            normed = self.attn_norm(x) if self.attn_norm is not None else x
            h = self.attn(normed, pos, cache)
            x = x + (self.attn_post_norm(h) if self.attn_post_norm is not None else h)
            if self.laurel is not None:
                x = (x + self.laurel(normed)) / math.sqrt(2)
        if self.mlp is not None:
            normed = self.ffn_norm(x) if self.ffn_norm is not None else x
            # an FFN that also reads the residual stream (Gemma 4's dense MLP beside routed experts)
            h = self.mlp(normed, x) if getattr(self.mlp, "wants_residual", False) else self._ffn(normed, ids)
            x = x + (self.ffn_post_norm(h) if self.ffn_post_norm is not None else h)
        if self.altup is not None:
            return self.altup.correct(streams, x)
        return x

    def add_per_layer_input(self, x, per_layer_input):
        """The rest of the layer after body(): its per-layer input gated in, the output scalar."""
        if self.altup is not None:
            if self.per_layer is not None:
                # into streams 1.. as the reference does (the active stream is 0 in every config)
                x[1:] += self.per_layer(self.altup.active_output(x), per_layer_input)
            return x
        if self.per_layer is not None:
            x = x + self.per_layer(x, per_layer_input)
        if self.layer_scalar is not None:
            x = x * self.layer_scalar
        return x

    def _ffn(self, normed, ids):
        """The FFN; a hash-routed MoE also reads the token ids."""
        return self.mlp(normed, ids=ids) if self.hashed else self.mlp(normed)


class LayerHyperConnection(HyperConnection):
    """One sub-block's hyper-connection, reading its tensors (layers.i.hc_attn_fn / _base / _scale)."""

    def __init__(self, d: int, h, norm_eps: float, index: int, part: str):
        super().__init__(d, h.streams, h.sinkhorn_iters, h.eps, norm_eps)
        self.stem = f"layers.{index}.hc_{part}_"

    def load_from(self, source, prefix: str, dtype, device) -> None:
        stem = f"{getattr(source, 'prefix', '')}{self.stem}"
        load_params(self, source, {p: f"{stem}{p}" for p in ("fn", "base", "scale")}, dtype, device)


class ModelHyperHead(HyperHead):
    """The streams' final collapse, reading hc_head.hc_fn / hc_base / hc_scale."""

    def load_from(self, source, prefix: str, dtype, device) -> None:
        stem = f"{getattr(source, 'prefix', '')}hc_head."
        load_params(self, source, {p: f"{stem}{p}" for p in ("hc_fn", "hc_base", "hc_scale")}, dtype, device)


class Transformer(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        d = spec.hidden_size
        self.embed = nn.Embedding(spec.vocab_size, d)
        self.pos_embed = nn.Embedding(spec.context_length or 1024, d) if spec.rope.learned_positions else None
        self.ropes = nn.ModuleDict()
        # LeRoPE: one learned frequency scale for every layer's RoPE (read from the tables' builds)
        self.rope_scale = LearnedRopeScale(spec) if spec.rope.learned_freq_scale else None
        layers = []
        for layer in spec.schedule:
            mixer = layer.linear_kind or ("shared_kv" if layer.kv_single else layer.mixer)
            if mixer not in MIXERS and mixer != "none":
                raise LlmarchError(f"layer {layer.index}: mixer {mixer!r} is not supported by llmarch run yet")
            if layer.ffn not in FFNS and layer.ffn != "none":
                raise LlmarchError(f"layer {layer.index}: FFN {layer.ffn!r} is not supported by llmarch run yet")
            rope = None
            key = _rope_key(spec, layer) if mixer != "shared_kv" else None  # it rotates pairs of its own
            if key is not None:
                (theta, skey, rot, head_dim), scaling = key
                name = f"r{len(self.ropes)}"
                for n, r in self.ropes.items():
                    if r.key == key[0]:
                        name = n
                        break
                else:
                    freq_scale = self.rope_scale.factors if self.rope_scale is not None else None
                    r = Rope(head_dim, rot, theta, scaling, spec.context_length, freq_scale)
                    r.key = key[0]
                    self.ropes[name] = r
                rope = self.ropes[name]
            layers.append(
                Block(
                    spec,
                    layer,
                    MIXERS[mixer](spec, layer, rope) if mixer != "none" else None,
                    FFNS[layer.ffn](spec, layer) if layer.ffn != "none" else None,
                )
            )
        self.layers = nn.ModuleList(layers)
        self.final_norm = make_norm(spec.norm.kind, d, spec.norm.eps, spec.norm.unit_offset)
        self.lm_head = None if spec.tied_embeddings else nn.Linear(d, spec.vocab_size, bias=False)
        self.tied_quant = None  # BlockQuantLinear shared by the embedding and the head (--keep-quantized, tied)
        self.embed_scale = spec.embedding_scale
        self.final_softcap = spec.final_softcap
        self.fused_head_norm = gemv_cuda.fused_norm()  # the final norm in the head GEMV's prologue (head())
        self.per_layer_inputs = PerLayerInputs(spec) if spec.per_layer_embeddings else None
        # start() runs the first layer's body too: it needs no per-layer row
        self._first_split = self.per_layer_inputs is not None and len(layers) > 0 and layers[0].hyper is None
        self.altup_streams = AltUpStreams(spec) if spec.altup else None
        h = spec.hyper
        self.hyper_head = ModelHyperHead(d, h.streams, h.eps, spec.norm.eps or 1e-6) if h is not None else None

    def setup(self, max_seq: int, device, dtype) -> None:
        self.act_dtype = dtype
        for r in self.ropes.values():
            r.build(max_seq, device, dtype)

    def forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        cache,
        limit: int | None = None,
        last_only: bool = True,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """last: the row whose logits to return (a one-element index tensor), where the chunk's last
        row is not the prompt's last token (a prefill padded to a captured length)."""
        return self.finish(ids, pos, cache, *self.start(ids, pos, cache, limit), last_only=last_only, last=last)

    def start(self, ids: torch.Tensor, pos: torch.Tensor, cache, limit: int | None = None):
        """A step up to the first read of the per-layer table's rows: the embedding, its per-layer
        projection and the first layer's body. A decode step that takes those rows from the host
        runs this part while the host fetches them (Generator). Returns (x, projection): finish()'s
        input."""
        cache.prepare(pos, limit)
        x = self.embed_ids(ids, pos)
        pli = self.per_layer_inputs
        proj = pli.project(x) if pli is not None else None
        if self.altup_streams is not None:
            x = self.altup_streams.expand(x)
        if self.hyper_head is not None:
            x = x.unsqueeze(2).expand(-1, -1, self.spec.hyper.streams, -1).contiguous()
        if self._first_split:
            x = self.layers[0].body(x, pos, cache, ids)
        return x, proj

    def finish(
        self, ids, pos, cache, x, proj, last_only: bool = True, last: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The rest of the step after start(): the per-layer table's rows, the layers, the head."""
        ple = self.per_layer_inputs.combine(ids, proj) if proj is not None else None
        for i, block in enumerate(self.layers):
            part = None if ple is None else ple[:, :, i]
            x = (
                block.add_per_layer_input(x, part)
                if i == 0 and self._first_split
                else block(x, pos, cache, part, ids=ids)
            )
        if self.hyper_head is not None:
            x = self.hyper_head(x)
        if last is not None:
            x = x.index_select(-2, last)
        elif last_only:
            x = x[..., -1:, :]
        if self.altup_streams is not None:
            x = self.altup_streams.collapse(x)
        return self.head(x)

    def embed_ids(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token (and learned position) embeddings: the input of the first block."""
        if self.tied_quant is not None:
            x = self.tied_quant.row(ids, self.act_dtype)
        else:
            x = self.embed(ids)
        if self.embed_scale is not None:  # Gemma: the scale is rounded to the activation dtype first
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, output projection (tied, quantized or own), soft-capping."""
        if (
            self.fused_head_norm
            and x.shape[-2] == 1
            and self.lm_head is not None
            and self.tied_quant is None
            and gemv_cuda.on_device(x)
        ):
            logits = gemv_cuda.normed_linear(x, self.lm_head, self.final_norm)  # the norm its prologue
        else:
            logits = self.project_out(self.final_norm(x))
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        """The output projection of the normed row: tied, quantized or own."""
        if self.tied_quant is not None:
            logits = self.tied_quant(x)
        elif self.lm_head is None:
            logits = F.linear(x, self.embed.weight)
        else:
            logits = self.lm_head(x)
        return logits


def build_model(spec: ArchSpec) -> Transformer:
    with torch.device("meta"):
        return Transformer(spec)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def load_weights(
    model: Transformer, source, dtype: torch.dtype, device, quant_bits: int | None = None, stored_blocks: bool = False
) -> None:
    """Assign every parameter from `source` (checking shapes), fusing q/k/v and gate/up on the way.

    quant_bits: replace each Linear by its weight-only int8/int4 form as soon as it is loaded, so the
    float copy of one matrix at a time is all that is ever held. stored_blocks: a GGUF's Linears whose
    stored block type the device's kernels read (gguf_matmul on the CPU, gguf_cuda on CUDA) run from
    the file's blocks instead (the others as quant_bits says, or in float without it).
    """
    from llmarch.runtime.gguf_matmul import from_source
    from llmarch.runtime.quant import GROUP, BlockQuantLinear, quantize_linear

    def stored(mname: str, shape) -> nn.Module | None:
        if not stored_blocks:
            return None
        owner_path, _, leaf = mname.rpartition(".")
        parts = getattr(model.get_submodule(owner_path) if owner_path else model, "fused", {}).get(leaf)
        names = [f"{owner_path}.{p}.weight" for p in parts] if parts else [f"{mname}.weight"]
        if torch.device(device).type == "cuda":
            from llmarch.runtime import gguf_cuda

            return gguf_cuda.from_source(source, names, tuple(shape), device)
        return from_source(source, names, tuple(shape))

    def spec_tied_ok(mod) -> bool:
        return mod.weight.shape[1] % GROUP == 0

    where = str(source.ckpt.path)

    def fetch(name: str, shape) -> torch.Tensor:
        mod_path, _, kind = name.rpartition(".")
        owner_path, _, leaf = mod_path.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        parts = getattr(owner, "fused", {}).get(leaf)
        if parts:
            tensors = [fetch1(f"{owner_path}.{p}.{kind}") for p in parts]
            t = torch.cat([x.to(dtype) for x in tensors], dim=0)
        else:
            t = fetch1(name)
        if tuple(t.shape) != tuple(shape):
            raise LlmarchError(f"weight {name} has shape {tuple(t.shape)}, the spec needs {tuple(shape)}", where)
        return t

    def fetch1(name: str) -> torch.Tensor:
        t = source.get(name)
        if t is None:
            raise LlmarchError(f"weight missing: {name} (looked for {source.name_of(name) or 'no mapping'})", where)
        return t

    self_loaded: tuple[str, ...] = ()
    for mname, mod in list(model.named_modules()):
        if self_loaded and mname.startswith(self_loaded):
            continue
        if hasattr(mod, "load_from"):  # MoE/MLA modules read their own Hub tensors
            mod.load_from(source, mname, dtype, device)
            self_loaded += (mname + ".",)
            continue
        if (
            (quant_bits or stored_blocks)
            and mname == "embed"
            and model.lm_head is None
            and spec_tied_ok(mod)
            and source.info("embed.weight") is not None
        ):
            # tied: one quantized table serves the embedding lookup and the head, quantized from
            # slabs of rows so the float table is never held whole
            shape = tuple(source.info("embed.weight").shape)
            if shape != tuple(mod.weight.shape):
                raise LlmarchError(
                    f"weight embed.weight has shape {shape}, the spec needs {tuple(mod.weight.shape)}", where
                )
            tied = stored("embed", shape)
            if tied is not None or quant_bits:  # stored blocks alone: a table of other types stays float
                model.tied_quant = tied or BlockQuantLinear(
                    None, None, quant_bits, rows=(lambda a, b: source.rows("embed.weight", a, b), *shape, device)
                )
                model.embed = None
                continue
        if (
            (quant_bits or stored_blocks)
            and isinstance(mod, nn.Linear)
            and mname.startswith(("layers.", "lm_head"))
            and mod.bias is None
        ):
            from_file = stored(mname, mod.weight.shape)
            if from_file is not None:
                parent, leaf = _parent(model, mname)
                setattr(parent, leaf, from_file)
                continue
        own = list(mod._parameters.items())
        for pname, p in own:
            if p is None:
                continue
            name = f"{mname}.{pname}" if mname else pname
            t = fetch(name, p.shape).to(device=device, dtype=dtype)
            mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
        if quant_bits and isinstance(mod, nn.Linear) and mname.startswith(("layers.", "lm_head")):
            parent, leaf = _parent(model, mname)
            setattr(parent, leaf, quantize_linear(mod, quant_bits))
    finish_loading(model, device)


def finish_loading(model: nn.Module, device) -> None:
    """What follows putting the weights in place (load_weights; a benchmark filling random ones):
    norms' unit offsets folded, and on CUDA the one-token steps' float16/bfloat16 matmuls on the
    Triton GEMV (gemv_cuda.use_for_decode)."""
    for mod in model.modules():
        if isinstance(mod, RMSNorm):
            mod.fold_unit_offset()
    if torch.device(device).type == "cuda":
        from llmarch.runtime.gemv_cuda import use_for_decode

        use_for_decode(model)
