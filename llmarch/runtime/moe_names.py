"""Where an MoE layer's tensors live in a Hub safetensors checkpoint, read into one layout.

Returns {router [E, d], router_bias [E]?, gate_up [E, 2I, d] (gate rows, then up rows),
down [E, d, I], gate_up_bias/down_bias?, shared_gate/up/down?, shared_gate_w?} from any of:
  per expert  {blk}.experts.{e}.{gate_proj|w1, up_proj|w3, down_proj|w2}.weight
              (Qwen3-MoE, DeepSeek V3, GLM-4.5, MiniMax-M2's block_sparse_moe, AfMoE, MiMo)
  fused       {blk}.experts.gate_up_proj [E, d, 2I], down_proj [E, I, d] (Llama 4: gate|up halves;
              gpt-oss: gate/up interleaved columns, + biases)
  MXFP4       gpt-oss as shipped: *_blocks [E, rows, d/32, 16] + *_scales [E, rows, d/32] (e8m0)
Errors are one line (LlmarchError): missing experts, shapes that disagree with the config, a
storage type the runtime cannot read.
"""

from __future__ import annotations

import torch

from llmarch.errors import LlmarchError
from llmarch.runtime.experts.formats import ExpertFormat, mxfp4_dequant

# mixer: Nemotron-H's single-op layers; ffn: DeepSeek's own names (V4 as transformers saves it)
BLOCKS = ("mlp", "block_sparse_moe", "feed_forward", "mixer", "ffn")
READABLE = ("F32", "F16", "BF16")


class _Layer:
    def __init__(self, source, moe):
        self.source, self.moe = source, moe
        self.names = source.ckpt.tensors
        self.where = str(source.ckpt.path)
        base = f"{getattr(source, 'prefix', '')}layers.{moe.index}."
        keys = self._keys(base)
        self.blk = next((f"{base}{b}" for b in BLOCKS if any(n.startswith(f"{base}{b}.") for n in keys)), None)
        if not any(n.startswith(f"{self.blk}.experts.") for n in keys) and any(
            n.startswith(f"{base}experts.") for n in keys
        ):
            self.blk = base[:-1]  # experts and router directly in the layer, beside its dense mlp (Gemma 4)
        if self.blk is None:
            raise LlmarchError(
                f"layer {moe.index}: no MoE tensors ({'/'.join(BLOCKS)}.*) in the checkpoint", self.where
            )

    def _keys(self, base):
        return [n for n in self.names if n.startswith(base)]

    def has(self, suffix: str) -> bool:
        return f"{self.blk}.{suffix}" in self.names

    def raw(self, suffix: str) -> torch.Tensor:
        """A U8 tensor (MXFP4 blocks / e8m0 scales) as stored."""
        from llmarch.runtime.weights import _raw

        info = self.names.get(f"{self.blk}.{suffix}")
        if info is None:
            raise LlmarchError(
                f"layer {self.moe.index}: {self.blk}.{suffix} missing (MXFP4 experts need blocks and scales)",
                self.where,
            )
        if info.dtype != "U8":
            raise LlmarchError(f"tensor {info.name}: MXFP4 {suffix} stored as {info.dtype}, expected U8", self.where)
        return _raw(info).reshape(info.shape)

    def get(self, *suffixes: str, required: str | None = None) -> torch.Tensor | None:
        for s in suffixes:
            info = self.names.get(f"{self.blk}.{s}")
            if info is None:
                continue
            if info.dtype not in READABLE:
                raise LlmarchError(
                    f"tensor {info.name}: expert storage type {info.dtype} is not one llmarch run "
                    f"can read (readable: {', '.join(READABLE)}, MXFP4 *_blocks/*_scales)",
                    self.where,
                )
            return self.source.read(info).float()
        if required:
            raise LlmarchError(
                f"layer {self.moe.index}: {required} missing (looked for {self.blk}.{suffixes[0]})", self.where
            )
        return None


def has_mxfp4_experts(ckpt) -> bool:
    return any(n.endswith("experts.gate_up_proj_blocks") for n in ckpt.tensors)


def read_moe(source, moe, keep_stored=None) -> dict:
    """keep_stored: the ExpertFormat that reads the experts as stored (the placement's, when it
    keeps them so), or None. Such experts come back undequantized and gate_up / down
    are None: MXFP4 as out["mxfp4"] = (gate_up blocks, scales, down blocks, scales), gate rows then
    up rows; a GGUF's blocks as out["gguf_blocks"] = (gate, up, down) tensor infos ((up, None, down)
    for non-gated experts)."""
    if getattr(source.ckpt, "format", None) == "gguf":
        blocks = keep_stored if keep_stored is not None and keep_stored.ggml_type else None
        return _checked(_gguf_moe(source, moe, blocks), moe, str(source.ckpt.path))
    L = _Layer(source, moe)
    out: dict = {
        "router": L.get(
            "gate.weight", "router.weight", "router.gate.weight", "router.proj.weight", required="router weight"
        )
    }
    out["router_input_scale"] = L.get("router.scale")
    out["per_expert_scale"] = L.get("router.per_expert_scale")
    out["router_bias"] = L.get(
        "gate.e_score_correction_bias", "e_score_correction_bias", "router.bias", "expert_bias", "gate.bias"
    )
    out["tid2eid"] = _token_table(L)
    if L.has("experts.gate_up_proj") or L.has("experts.gate_up_proj_blocks"):
        _fused(L, out, moe, keep_stored is ExpertFormat.MXFP4)
    else:
        _per_expert(L, out, moe)
    own = {"gate": "w1", "up": "w3", "down": "w2"}  # DeepSeek's own names
    for pre in ("shared_experts", "shared_expert"):
        for style in ("{p}_proj", "{own}"):
            if L.has(f"{pre}.{style.format(p='up', own='w3')}.weight") and "shared_up" not in out:
                for p in ("gate", "up", "down") if moe.gated else ("up", "down"):
                    name = style.format(p=p, own=own[p])
                    out[f"shared_{p}"] = L.get(f"{pre}.{name}.weight", required="shared expert")
    out["shared_gate_w"] = L.get("shared_expert_gate.weight")
    return _checked(out, moe, L.where)


def _token_table(L: _Layer) -> torch.Tensor | None:
    """A hash-routed layer's token-id -> expert-ids table (gate.tid2eid, integers)."""
    info = L.names.get(f"{L.blk}.gate.tid2eid")
    if info is None:
        return None
    if info.dtype not in ("I64", "I32"):
        raise LlmarchError(f"tensor {info.name}: a token-to-expert table stored as {info.dtype}", L.where)
    from llmarch.runtime.weights import _raw

    return _raw(info).clone().view(torch.int64 if info.dtype == "I64" else torch.int32).reshape(info.shape).long()


def _checked(out: dict, moe, where: str) -> dict:
    """The shapes the config implies, whichever file format the tensors came from."""
    E, d, inter = moe.E, moe.d, moe.inter
    if tuple(out["router"].shape) != (E, d):
        raise LlmarchError(
            f"layer {moe.index}: router weight has shape {tuple(out['router'].shape)}, the config "
            f"says {E} experts x hidden {d}",
            where,
        )
    if out.get("router_bias") is not None and tuple(out["router_bias"].shape) != (E,):
        raise LlmarchError(
            f"layer {moe.index}: router bias has shape {tuple(out['router_bias'].shape)}, the config says {E} experts",
            where,
        )
    want = {"gate_up": (E, (2 if moe.gated else 1) * inter, d), "down": (E, d, inter)}
    if "gguf_blocks" in out:  # shapes and block type checked where the blocks are taken
        want = {}
    if "mxfp4" in out:  # blocks of 32 inputs, 16 bytes each
        want = {"gate_up": (E, 2 * inter, d // 32, 16), "down": (E, d, inter // 32, 16)}
        out["gate_up"], out["down"] = out["mxfp4"][0], out["mxfp4"][2]
    for k, shape in want.items():
        if tuple(out[k].shape) != shape:
            raise LlmarchError(
                f"layer {moe.index}: experts' {k} is {tuple(out[k].shape)}, the config needs {shape}", where
            )
    if "mxfp4" in out or "gguf_blocks" in out:
        out["gate_up"] = out["down"] = None
    if moe.shared is not None and "shared_up" not in out:
        raise LlmarchError(f"layer {moe.index}: the config has a shared expert, the checkpoint has none", where)
    return out


def _gguf_moe(source, moe, keep_blocks=None) -> dict:
    """llama.cpp's names (gguf-py's table): ffn_gate_inp (router), exp_probs_b (correction bias),
    ffn_{gate,up,down}_exps [E, out, in] stacked, ffn_*_shexp (shared expert), ffn_gate_inp_shexp.
    Quantized blocks are dequantized here unless keep_blocks, the expert format that reads them as
    stored (the CPU kernel's)."""
    import gguf

    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES

    def get(t, kind: str = "weight", required: str | None = None):
        name = f"{names[t].format(bid=moe.index)}.{kind}"
        info = source.ckpt.tensors.get(name)
        if info is None and required:
            raise LlmarchError(f"layer {moe.index}: {required} missing ({name})", str(source.ckpt.path))
        return None if info is None else source.read(info).float()

    bias = get(T.FFN_EXP_PROBS_B, "bias")  # DeepSeek-style correction bias, else gpt-oss's router bias
    out = {
        "router": get(T.FFN_GATE_INP, required="router weight"),
        "router_bias": bias if bias is not None else get(T.FFN_GATE_INP, "bias"),
    }
    if keep_blocks is not None:
        from llmarch.runtime.experts import gguf_blocks

        roles = (T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP) if moe.gated else (T.FFN_UP_EXP, None, T.FFN_DOWN_EXP)
        if moe.gated and f"{names[T.FFN_GATE_UP_EXP].format(bid=moe.index)}.weight" in source.ckpt.tensors:
            roles = (T.FFN_GATE_UP_EXP, None, T.FFN_DOWN_EXP)  # gate rows then up rows in one tensor (Gemma 4)
        blocks = tuple(
            None if r is None else source.ckpt.tensors.get(f"{names[r].format(bid=moe.index)}.weight") for r in roles
        )
        missing = [names[r].format(bid=moe.index) for r, b in zip(roles, blocks) if r is not None and b is None]
        if missing:
            raise LlmarchError(
                f"layer {moe.index}: routed experts missing ({', '.join(missing)})", str(source.ckpt.path)
            )
        gguf_blocks.check(blocks, moe, str(source.ckpt.path))
        out["gguf_blocks"] = blocks
    elif get(T.FFN_GATE_UP_EXP) is not None:  # gate rows then up rows in one tensor (Gemma 4)
        out["gate_up"], out["down"] = get(T.FFN_GATE_UP_EXP), get(T.FFN_DOWN_EXP, required="routed experts")
    else:
        gate, up = get(T.FFN_GATE_EXP, required="routed experts"), get(T.FFN_UP_EXP, required="routed experts")
        out["gate_up"], out["down"] = torch.cat([gate, up], dim=1), get(T.FFN_DOWN_EXP, required="routed experts")
    # Gemma 4's router input scale and per-expert scale, kept as .scale tensors (Gemma4Model.modify_tensors)
    out["router_input_scale"], out["per_expert_scale"] = get(T.FFN_GATE_INP, "scale"), get(T.FFN_DOWN_EXP, "scale")
    gb, ub = get(T.FFN_GATE_EXP, "bias"), get(T.FFN_UP_EXP, "bias")
    out["gate_up_bias"] = None if gb is None else torch.cat([gb, ub], dim=1)
    out["down_bias"] = get(T.FFN_DOWN_EXP, "bias")
    shared_gate = get(T.FFN_GATE_SHEXP)
    if shared_gate is not None:
        out["shared_gate"] = shared_gate
        out["shared_up"], out["shared_down"] = (
            get(T.FFN_UP_SHEXP, required="shared expert"),
            get(T.FFN_DOWN_SHEXP, required="shared expert"),
        )
    out["shared_gate_w"] = get(T.FFN_GATE_INP_SHEXP)
    return out


def _per_expert(L: _Layer, out: dict, moe) -> None:
    names = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
    if not moe.gated:  # up and down alone (Nemotron-H)
        del names["gate"]
    first = next(iter(names))
    missing = [e for e in range(moe.E) if not any(L.has(f"experts.{e}.{n}.weight") for n in names[first])]
    if missing:
        few = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise LlmarchError(
            f"layer {moe.index}: {len(missing)} of {moe.E} routed experts missing (experts {few}; "
            f"looked for {L.blk}.experts.N.{names[first][0]}.weight)",
            L.where,
        )
    parts = {
        k: [L.get(*(f"experts.{e}.{n}.weight" for n in v), required=f"expert {e} {k}") for e in range(moe.E)]
        for k, v in names.items()
    }
    if moe.gated:
        out["gate_up"] = torch.stack([torch.cat([g, u]) for g, u in zip(parts["gate"], parts["up"])])
    else:
        out["gate_up"] = torch.stack(parts["up"])
    out["down"] = torch.stack(parts["down"])


def _fused(L: _Layer, out: dict, moe, keep_mxfp4: bool = False) -> None:
    interleaved = moe.spec.moe.fused_gate_up == "interleaved"
    gate_then_up = (lambda t: torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)) if interleaved else (lambda t: t)
    if keep_mxfp4 and L.has("experts.gate_up_proj_blocks"):  # rows reordered, values untouched
        out["mxfp4"] = (
            gate_then_up(L.raw("experts.gate_up_proj_blocks")),
            gate_then_up(L.raw("experts.gate_up_proj_scales")),
            L.raw("experts.down_proj_blocks"),
            L.raw("experts.down_proj_scales"),
        )
        gub = L.get("experts.gate_up_proj_bias")
        out["gate_up_bias"] = None if gub is None else gate_then_up(gub)
        out["down_bias"] = L.get("experts.down_proj_bias")
        return
    if L.has("experts.gate_up_proj_blocks"):  # MXFP4 as shipped: [E, rows, d] after dequant
        gu = mxfp4_dequant(L.raw("experts.gate_up_proj_blocks"), L.raw("experts.gate_up_proj_scales"))
        down = mxfp4_dequant(L.raw("experts.down_proj_blocks"), L.raw("experts.down_proj_scales"))
    else:  # bf16/f32 in transformers' parameter layout [E, d, 2I] / [E, I, d], or already [E, 2I, d] / [E, d, I]
        gu = L.get("experts.gate_up_proj")
        down = L.get("experts.down_proj", required="experts' down_proj")
        # rows first (Gemma 4) where the shape says so; a square case (d == 2I) keeps the [E, d, 2I]
        # reading unless the recipe says the family stores rows first (fused_out_first)
        rows_first = moe.spec.moe.fused_out_first
        if not (gu.shape[1] == 2 * moe.inter and gu.shape[2] == moe.d and (moe.d != 2 * moe.inter or rows_first)):
            gu = gu.transpose(1, 2)
        if not (down.shape[1] == moe.d and down.shape[2] == moe.inter and (moe.d != moe.inter or rows_first)):
            down = down.transpose(1, 2)
    gub = L.get("experts.gate_up_proj_bias")
    # gpt-oss: gate = rows 0, 2, 4, ..., up = 1, 3, 5, ...
    gu, gub = gate_then_up(gu), None if gub is None else gate_then_up(gub)
    out["gate_up"], out["down"] = gu.contiguous(), down.contiguous()
    out["gate_up_bias"], out["down_bias"] = gub, L.get("experts.down_proj_bias")
