"""Compressed attention: layers that keep, beside a sliding window of recent keys, one compressed
KV entry per `ratio` tokens for the whole context, optionally scored by a lightning indexer of
their own (DeepSeek V4's compressed sparse / heavily compressed attention), and layers whose keys
and values are one projection cached once."""

from __future__ import annotations

import re

from llmarch.arch.fingerprint.facts import Facts, layer_has
from llmarch.arch.fingerprint.rope import compressed_rope
from llmarch.arch.spec import ArchSpec, HyperSpec
from llmarch.checkpoint.base import Checkpoint
from llmarch.checkpoint.config_check import MAX_COUNT, is_int
from llmarch.errors import CheckpointError

# the compressor's learned per-slot bias: one row per token of the window it pools
# (transformers' position_bias, DeepSeek's own name ape); the indexer's own compressor is apart
_POOL_BIAS = re.compile(r"(?<!indexer\.)compressor\.(ape|position_bias)$")
# a single projection whose output serves as key and value (no k_proj / v_proj beside it)
_SINGLE_KV = re.compile(r"(attn|self_attn)\.(wkv|kv_proj)\.weight$")


def read_compressed(spec: ArchSpec, f: Facts, lt, ckpt: Checkpoint) -> None:
    where = ckpt.path / "config.json" if ckpt.config is not None and ckpt.path.is_dir() else ckpt.path
    ratios = _config_ratios(f, spec.layers, str(where))
    types = f.get("layer_types")
    window = f.get("sliding_window", fact="sliding_window.window")
    for layer in spec.schedule:
        names = lt.get(layer.index, ())
        from_tensors = _tensor_ratio(names, ckpt, str(ckpt.path))
        from_config = ratios.get(layer.index)
        if names and from_config is not None and from_tensors != from_config:
            spec.warnings.append(
                f"config compresses layer {layer.index} by {from_config}, its compressor pools {from_tensors or 'nothing'}"
            )
        ratio = from_tensors if names else from_config
        if names:
            layer.kv_single = any(_SINGLE_KV.search(n) for n in names) and not any(
                n.endswith(("k_proj.weight", "v_proj.weight")) for n in names
            )
        if not ratio:
            continue
        layer.compress_ratio = ratio
        if names:
            layer.compressed_index = layer_has(lt, layer.index, "indexer")
        else:  # no tensors: the config's layer type names the sparse (indexed) kind
            t = types[layer.index] if isinstance(types, list) and layer.index < len(types) else ""
            layer.compressed_index = spec.attention.indexer and "sparse" in str(t)
        if window:  # the compressed entries extend a sliding window, they do not replace it
            layer.mixer, layer.window = "sliding", window
    if any(l.compress_ratio for l in spec.schedule):
        spec.evidence["layer_schedule.compress_ratio"] = "compressor position-bias rows" if lt else "compress_rates"
        _compressed_layers_rope(spec, f)
    spec.attention.out_groups = f.get("o_groups", fact="attention.out_groups")
    spec.attention.out_rank = f.get("o_lora_rank", fact="attention.out_rank")
    streams = f.get("hc_mult", fact="hyper.streams")
    # the streams' mixing weights sit in every layer (hc_attn_fn as DeepSeek and transformers save them)
    mixes = any(n.endswith(("hc_attn_fn", "attn_hc.fn")) for ns in lt.values() for n in ns)
    if streams and (mixes or not lt):
        spec.hyper = HyperSpec(
            streams=int(streams),
            sinkhorn_iters=int(f.get("hc_sinkhorn_iters", default=20, fact="hyper.sinkhorn_iters")),
            eps=float(f.get("hc_eps", default=1e-6, fact="hyper.eps")),
        )


def _compressed_layers_rope(spec: ArchSpec, f: Facts) -> None:
    """A compressed layer's whole attention (window and compressed entries) rotates by the
    compressed RoPE, where it differs from the model's."""
    theta, scaling = compressed_rope(spec, f, spec.recipe)
    for layer in spec.schedule:
        if not (layer.compress_ratio and layer.rope):
            continue
        if theta != spec.rope.theta:
            layer.rope_theta = theta
        if scaling != spec.rope.scaling:
            layer.rope_scaling = scaling or {"type": "default"}


def _tensor_ratio(names, ckpt: Checkpoint, where: str) -> int | None:
    for n in names:
        if _POOL_BIAS.search(n):
            shape = ckpt.tensors[n].shape
            if len(shape) != 2 or not 0 < shape[0] <= MAX_COUNT:
                raise CheckpointError(f"compressor tensor {n} has shape {list(shape)}; expected [ratio, width]", where)
            return int(shape[0])
    return None


def _config_ratios(f: Facts, n: int, where: str) -> dict[int, int]:
    """Layer -> compression ratio from compress_rates (per layer type) or compress_ratios (per
    layer, 0 = none); layers without compression are left out."""
    rates = f.get("compress_rates", fact="layer_schedule.compress_ratio")
    types = f.get("layer_types")
    per_layer = f.get("compress_ratios", fact="layer_schedule.compress_ratio")
    out: dict[int, int] = {}
    if isinstance(rates, dict) and isinstance(types, list):
        for i, t in enumerate(types[:n]):
            r = rates.get(t)
            if r is not None:
                out[i] = _checked_ratio(r, f"compress_rates[{t!r}]", where)
    elif isinstance(per_layer, list):
        for i, r in enumerate(per_layer[:n]):
            if _checked_ratio(r, f"compress_ratios[{i}]", where, zero_ok=True):
                out[i] = int(r)
    return out


def _checked_ratio(value, key: str, where: str, zero_ok: bool = False) -> int:
    if not is_int(value) or not (0 if zero_ok else 1) <= value <= MAX_COUNT:
        raise CheckpointError(f"{key} is {value!r}: a compression ratio is a whole number of tokens >= 1", where)
    return int(value)
