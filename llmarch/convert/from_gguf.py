"""GGUF -> Hugging Face folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)
that transformers' from_pretrained loads.

config.json: llmarch.arch.gguf_config's reading of the metadata plus the family's recipe (what
llama.cpp hard-codes), in the shape transformers' config class expects. Tensors: renamed back
through layout.py, un-permuted, norm shift undone, experts split, dequantized with gguf.quants
(K-quants included) to --dtype, and streamed into a safetensors file whose header is written first.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from llmarch.arch.rope_factors import UNKNOWN_DIVISORS
from llmarch.checkpoint.base import TensorInfo
from llmarch.convert.gguf_meta import LLMARCH_ROPE_KEY
from llmarch.convert.layout import EXPERT_KINDS, GENERATED, Family, family_from_gguf, gguf_kind_of, hf_name_for
from llmarch.convert.output import (
    checkpoint_inputs,
    claim,
    publishing,
    pwrite_all,
    refuse_overlap,
    reserve,
    source_inputs,
    write_all,
)
from llmarch.convert.plan import V_HEAD_AXES, reorder_v_heads, tensor_bytes
from llmarch.convert.writer import to_f32
from llmarch.errors import LlmarchError
from llmarch.qk_permute import from_gguf_order

CHUNK_ELEMS = 1 << 22  # elements per row block: memory stays bounded by a few blocks per thread
OUT_DTYPES = {"f32": ("F32", np.float32, 4), "f16": ("F16", np.float16, 2), "bf16": ("BF16", np.uint16, 2)}


def dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(shape)
    if qtype == Q.BF16:
        return to_f32(raw.view(np.uint16), "BF16").reshape(shape)
    return gguf.quants.dequantize(raw.view(np.uint8), qtype).reshape(shape)


def cast(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return x.astype(np.float32, copy=False)
    if dtype == "f16":
        return x.astype(np.float16)
    return gguf.quants.quantize(x.astype(np.float32, copy=False), Q.BF16).view(np.uint16).reshape(x.shape)


def _gguf_items(ckpt, fam: Family, n_blocks: int):
    """(gguf TensorInfo, [(hf name, expert index or None)]) for every tensor carried back."""
    items, unknown = [], []
    split_qkvz = _split_qkvz(ckpt)
    for name, info in ckpt.tensors.items():
        found = gguf_kind_of(name, fam.arch, n_blocks)
        if found is None:
            unknown.append(name)
            continue
        kind, bid = found
        if bid is not None and bid >= n_blocks:
            continue  # MTP blocks llama.cpp appends after the main stack (nextn_predict_layers): not carried back
        if split_qkvz and kind in (gguf.MODEL_TENSOR.ATTN_QKV, gguf.MODEL_TENSOR.ATTN_GATE):
            if kind == gguf.MODEL_TENSOR.ATTN_QKV:  # the gate (z) is read with it, regrouped into in_proj_qkvz
                qkvz = hf_name_for(fam, gguf.MODEL_TENSOR.SSM_IN, bid, ".weight", n_blocks, path=ckpt.path)
                items.append((info, kind, [(qkvz, None)]))
            continue
        if kind in GENERATED or kind == gguf.MODEL_TENSOR.ATTN_V_B:
            continue  # V_B is read together with K_B (merged back into kv_b_proj)
        if kind == gguf.MODEL_TENSOR.ATTN_K_B:
            kind = gguf.MODEL_TENSOR.ATTN_KV_B
        if name.endswith(".scale"):  # an HF parameter llama.cpp keeps as a tensor's .scale (recipe hf_scales)
            scale = fam.recipe.convert.hf_scales.get(kind.name)
            if scale is None:
                unknown.append(name)
            else:
                items.append((info, kind, [(scale.format(bid=bid), None)]))
            continue
        suffix = ".bias" if name.endswith(".bias") else ".weight"
        if fam.fused_experts and kind in EXPERT_KINDS:  # gpt-oss: one fused HF tensor per kind pair
            if kind == gguf.MODEL_TENSOR.FFN_UP_EXP:
                continue  # read together with the gate (interleaved back into gate_up_proj)
            base = "gate_up_proj" if kind == gguf.MODEL_TENSOR.FFN_GATE_EXP else "down_proj"
            items.append(
                (
                    info,
                    kind,
                    [(fam.fused_prefix.format(bid=bid) + f".{base}" + ("_bias" if suffix == ".bias" else ""), None)],
                )
            )
            continue
        if fam.split_on_index(kind) and "{xid}" in fam.recipe.convert.hf_names.get(kind.name, "{xid}"):
            # one HF tensor per index, unless the recipe names one tensor for all (Gemma 4's experts)
            names = [
                (hf_name_for(fam, kind, bid, suffix, n_blocks, xid=x, path=ckpt.path), x) for x in range(info.shape[0])
            ]
        else:
            names = [(hf_name_for(fam, kind, bid, suffix, n_blocks, path=ckpt.path), None)]
        items.append((info, kind, names))
    if unknown:
        raise LlmarchError(
            f"{len(unknown)} GGUF tensor(s) have no Hugging Face name for {fam.family}, e.g. {', '.join(unknown[:3])}",
            ckpt.path,
        )
    return items


def hf_config(ckpt, fam: Family, spec, tied: bool, dtype: str) -> dict:
    from llmarch.arch.gguf_config import gguf_to_config
    from llmarch.checkpoint.gguf import read_rope_freqs

    meta = ckpt.metadata
    arch = meta["general.architecture"]
    cfg, _ = gguf_to_config(arch, meta, fam.recipe, read_rope_freqs(ckpt))
    need = ("num_hidden_layers", "hidden_size", "num_attention_heads")
    missing = [k for k in need if not cfg.get(k)]
    if missing:
        raise LlmarchError(
            f"GGUF metadata lacks what config.json needs: {', '.join(missing)} "
            f"({', '.join(f'{arch}.' + k for k in ('block_count', 'embedding_length', 'attention.head_count'))})",
            ckpt.path,
        )
    emb = ckpt.tensors.get("token_embd.weight")
    cfg["vocab_size"] = emb.shape[0] if emb else spec.vocab_size
    _per_layer_keys(cfg, spec, fam.recipe.convert)
    for k in [k for k in cfg if k.startswith("gguf_") or k.endswith("_per_layer")]:
        values = cfg.pop(k)
        # 0 marks a layer without that part (a hybrid's recurrent layers); other differences that
        # no config key of the family explains cannot be written
        if k.endswith("_per_layer") and len({v for v in values if v}) > 1:
            raise LlmarchError(
                f"the GGUF's {k[: -len('_per_layer')]} differs by layer ({values}); "
                "converting that back to config.json is not supported yet",
                ckpt.path,
            )
    if any(l.v_from_k for l in spec.schedule) and not fam.recipe.convert.v_from_k_key:
        raise LlmarchError(
            "layers whose values are their key projection (no attn_v): "
            "converting that back to config.json is not supported yet",
            ckpt.path,
        )
    if not spec.attention.mla:
        cfg.pop("v_head_dim", None)
    else:  # llama.cpp stores absorbed MLA as one latent KV head; HF counts the real heads
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
        cfg["qk_nope_head_dim"] = cfg.pop("head_dim") - cfg["qk_rope_head_dim"]
        cfg.setdefault("num_nextn_predict_layers", 0)  # MTP layers are not in llama.cpp's file
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if isinstance(meta.get(f"tokenizer.ggml.{key}_token_id"), int):
            cfg[name] = meta[f"tokenizer.ggml.{key}_token_id"]
    # rope: the HF shape transformers >= 4.57 reads (legacy keys; v5 converts them)
    scaling = meta.get(LLMARCH_ROPE_KEY)
    if scaling:
        cfg["rope_scaling"] = json.loads(scaling)
    elif (cfg.get("rope_scaling") or {}).get("rope_type") == UNKNOWN_DIVISORS:
        raise LlmarchError(
            "GGUF's rope_freqs divisors match no RoPE scaling config.json can hold; it cannot be rebuilt exactly",
            ckpt.path,
        )
    elif "rope_scaling" in cfg:  # YaRN's betas, DeepSeek's mscale, Llama 3's divisors: read by gguf_to_config
        cfg["rope_scaling"] = {k: v for k, v in cfg["rope_scaling"].items() if v is not None}
    elif "rope_parameters" in cfg:  # per layer type, read from rope_freqs (Gemma 4's proportional RoPE)
        for key in ("rope_theta", "rope_local_base_freq"):  # held in rope_parameters
            cfg.pop(key, None)
    pattern = cfg.pop("sliding_window_pattern", None)
    if isinstance(pattern, int) and pattern > 1 and cfg.get("sliding_window") and "layer_types" not in cfg:
        cfg["layer_types"] = [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(cfg["num_hidden_layers"])
        ]
    conv = fam.recipe.convert
    sparse = cfg.get("activation_sparsity_pattern")
    if isinstance(sparse, list):  # one value per layer in config.json (gguf_config lists the sparse ones)
        cfg["activation_sparsity_pattern"] = sparse + [0.0] * (spec.layers - len(sparse))
    if spec.per_layer_embeddings:  # llama.cpp's table has a row per token of the vocab
        cfg["vocab_size_per_layer_input"] = cfg["vocab_size"]
    if conv.query_scalar_key:  # llama.cpp scales queries by 1/sqrt(head_dim); the HF config class defaults otherwise
        cfg.setdefault(conv.query_scalar_key, cfg.get("head_dim"))
    cfg["attention_bias"] = spec.attention.bias  # from the tensors: GGUF has no key for it
    if conv.qk_norm_key:  # families whose config switches QK-norm on (GLM-4.5: use_qk_norm)
        cfg[conv.qk_norm_key] = bool(spec.attention.qk_norm)
    if conv.moe_key:  # families whose config switches the routed experts on (Gemma 4: enable_moe_block)
        cfg[conv.moe_key] = spec.moe is not None
    if spec.mtp_layers or conv.drops_mtp:
        cfg["num_nextn_predict_layers"] = 0  # MTP layers are not carried back
    for src, dst in conv.hf_keys.items():
        if src in cfg:
            cfg[dst] = cfg.pop(src)
    cfg.update(conv.hf_fixed)
    for k, v in cfg.items():  # GGUF stores float32: 1e-06, not 9.99999997e-07
        if isinstance(v, float):
            cfg[k] = float(str(np.float32(v)))
    cfg.update(
        model_type=fam.model_type,
        architectures=[fam.hf_class],
        tie_word_embeddings=tied,
        torch_dtype={"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype],
    )
    return dict(sorted(cfg.items()))


def _per_layer_keys(cfg: dict, spec, conv) -> None:
    """Per-layer facts a family's config.json says with keys of its own (Gemma 4): values that are
    the keys' projection, the full layers' own KV heads (which transformers applies only with
    that), FFNs twice as wide on the layers that reuse another layer's KV. The GGUF's per-layer
    lists they explain are dropped; what they do not explain stays and is refused."""
    sched = spec.schedule
    if conv.v_from_k_key and any(l.v_from_k for l in sched):
        cfg[conv.v_from_k_key] = True
        kv = cfg.get("num_key_value_heads_per_layer")
        sliding = {h for h, l in zip(kv or [], sched) if l.mixer == "sliding"}
        full = {h for h, l in zip(kv or [], sched) if l.mixer != "sliding"}
        if conv.global_kv_heads_key and len(kv or []) == len(sched) and len(sliding) == len(full) == 1:
            cfg["num_key_value_heads"], cfg[conv.global_kv_heads_key] = sliding.pop(), full.pop()
            del cfg["num_key_value_heads_per_layer"]
    widths = cfg.get("intermediate_size_per_layer")
    if conv.double_wide_key and isinstance(widths, list) and len(widths) == len(sched):
        base = widths[0]
        if widths == [base * (2 if l.kv_shared_from is not None else 1) for l in sched]:
            cfg["intermediate_size"], cfg[conv.double_wide_key] = base, True
            del cfg["intermediate_size_per_layer"]


def convert_from_gguf(
    source: str, out_dir: str | Path, dtype: str = "f32", force: bool = False, threads: int | None = None
) -> dict:
    from llmarch.api import load_checkpoint_spec

    t0 = time.perf_counter()
    if dtype not in OUT_DTYPES:
        raise LlmarchError(f"unknown --dtype {dtype!r} for safetensors; one of {', '.join(OUT_DTYPES)}")
    out = Path(out_dir)
    claim(out, source_inputs(source), force, folder=True)
    ckpt, spec = load_checkpoint_spec(source)
    if ckpt.format != "gguf":
        raise LlmarchError("--to safetensors needs a .gguf source", ckpt.path)
    refuse_overlap(out, checkpoint_inputs(ckpt))  # the other parts of a split GGUF
    fam = family_from_gguf(spec, ckpt.path)
    items = _gguf_items(ckpt, fam, spec.layers)
    tied = "output.weight" not in ckpt.tensors
    config = hf_config(ckpt, fam, spec, tied, dtype)
    tok = None
    if "tokenizer.ggml.model" in ckpt.metadata:
        from llmarch.convert.tokenizer_gguf import build_hf_tokenizer

        tok = build_hf_tokenizer(ckpt)

    with publishing(out, folder=True) as tmp:  # complete under `out`, or not there at all
        _write_safetensors(tmp / "model.safetensors", out, ckpt, fam, items, spec, dtype, threads)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tok:
            (tmp / "tokenizer.json").write_text(tok[0])
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok[1], indent=2) + "\n")
    return {
        "output": str(out),
        "family": fam.family,
        "tensors": sum(len(n) for _, _, n in items),
        "tokenizer": ckpt.metadata.get("tokenizer.ggml.model") if tok else None,  # as --to gguf says it
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _write_safetensors(path: Path, out: Path, ckpt, fam: Family, items, spec, dtype: str, threads) -> None:
    st_dtype, _, size = OUT_DTYPES[dtype]
    header, jobs, pos = {"__metadata__": {"format": "pt"}}, [], 0
    for info, kind, names in items:
        hf_shape = _hf_shape_of(ckpt, fam, info, kind, names)
        for hf, _xid in names:
            n = math.prod(hf_shape) * size
            header[hf] = {"dtype": st_dtype, "shape": list(hf_shape), "data_offsets": [pos, pos + n]}
            pos += n
        jobs.append((info, kind, names))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    src_fd: dict[Path, int] = {}

    def read(info):
        buf = np.empty(info.nbytes, dtype=np.uint8)
        _pread(src_fd[info.file], buf, info.offset)
        return dequantize(buf, Q[info.dtype], info.shape)

    def whole(job):
        info, kind, names = job
        x = _hf_whole(read, ckpt, fam, spec, job)
        for hf, xid in names:
            part = _hf_part(x, xid, hf, header[hf]["shape"], fam, kind, spec)
            data = np.ascontiguousarray(cast(part, dtype))
            pwrite_all(fd, data, base + header[hf]["data_offsets"][0])

    def rows(job, r0, n):
        """Rows [r0, r0 + n) of a tensor written as is: experts and row blocks are contiguous on both sides."""
        info, kind, names = job
        cols = info.shape[-1]
        row_bytes = tensor_bytes((cols,), Q[info.dtype])
        buf = np.empty(n * row_bytes, dtype=np.uint8)
        _pread(src_fd[info.file], buf, info.offset + r0 * row_bytes)
        x = dequantize(buf, Q[info.dtype], (n, cols))
        if _shifted(fam, kind, names[0][0]):
            x = x - np.float32(fam.norm_shift)
        data = np.ascontiguousarray(cast(x, dtype))
        pwrite_all(fd, data, base + header[names[0][0]]["data_offsets"][0] + r0 * cols * size)

    work = []
    for job in jobs:
        info, kind, names = job
        simple = (
            kind not in (gguf.MODEL_TENSOR.ATTN_KV_B, gguf.MODEL_TENSOR.ATTN_QKV)
            and not (fam.fused_experts and kind in EXPERT_KINDS)
            and len(info.shape) >= 2
            and not any(fam.transposed(n) for n, _ in names)
            and not (fam.permute_qk and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K))
            and not _linear_relaid(fam, kind, spec)
        )
        if not simple:
            work.append((whole, job))
            continue
        total, step = math.prod(info.shape[:-1]), max(1, CHUNK_ELEMS // info.shape[-1])
        work += [(rows, job, r, min(step, total - r)) for r in range(0, total, step)]

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        reserve(fd, base + pos, out)  # a full disk fails here, before any work
        pwrite_all(fd, len(raw).to_bytes(8, "little") + raw, 0)
        src_fd.update((p, os.open(p, os.O_RDONLY)) for p in ckpt.files)
        write_all(work, threads or os.cpu_count() or 1)
    finally:
        os.close(fd)
        for f in src_fd.values():
            os.close(f)


def _fused_shape(shape: tuple[int, ...], kind) -> tuple[int, ...]:
    """HF shape of gpt-oss's fused experts: gate_up [E, H, 2F] (bias [E, 2F]), down [E, F, H]."""
    if len(shape) == 2:
        return (shape[0], shape[1] * 2) if kind == gguf.MODEL_TENSOR.FFN_GATE_EXP else shape
    e, a, b = shape
    return (e, b, a * 2) if kind == gguf.MODEL_TENSOR.FFN_GATE_EXP else (e, b, a)


def _fuse_experts(x: np.ndarray, kind, read_up, split: str = "interleaved") -> np.ndarray:
    """Inverse of plan._fused_experts: gate/up back (interleaved even/odd, or halves) and transposed to [E, in, out]."""
    if kind == gguf.MODEL_TENSOR.FFN_DOWN_EXP:
        return x.transpose(0, 2, 1) if x.ndim == 3 else x
    up = read_up()
    if split == "halves":
        out = np.concatenate([x, up], axis=1)
        return out.transpose(0, 2, 1) if out.ndim == 3 else out
    out = np.empty((*x.shape[:1], x.shape[1] * 2, *x.shape[2:]), dtype=x.dtype)
    out[:, 0::2], out[:, 1::2] = x, up
    return out.transpose(0, 2, 1) if out.ndim == 3 else out


def _merge_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """llama.cpp's attn_k_b [H, r, nope] + attn_v_b [H, v, r] -> HF kv_b_proj [H * (nope + v), r]."""
    h, r, _ = k_b.shape
    return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, r)


def _pread(fd: int, buf: np.ndarray, offset: int) -> None:
    mv, done = memoryview(buf).cast("B"), 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            raise LlmarchError("unexpected end of GGUF file")
        done += n


def _split_qkvz(ckpt) -> bool:
    """A Gated DeltaNet GGUF whose in_proj_ba stayed fused (ssm_ba) but whose in_proj_qkvz llama.cpp's
    own converter split into attn_qkv (q, k, v, each over all heads) and attn_gate (z): read back as
    the grouped in_proj_qkvz (llmarch's converter keeps it fused, as ssm_in)."""
    names = ckpt.tensors
    return any(n.endswith(".ssm_ba.weight") for n in names) and any(n.endswith(".attn_qkv.weight") for n in names)


def _regroup_qkvz(qkv: np.ndarray, z: np.ndarray, spec) -> np.ndarray:
    """Undo Qwen3NextModel.modify_tensors: in_proj_qkvz holds [q, k, v, z] per key head, where
    attn_qkv holds every head's q, then every head's k, then v (value heads in key-head order),
    and attn_gate z."""
    lin, cols = spec.linear, qkv.shape[-1]
    nk, dk = lin.key_heads, lin.key_head_dim
    per_v = lin.value_heads // nk * lin.value_head_dim  # value rows of one key head's group
    q, k, v = np.split(qkv, [nk * dk, 2 * nk * dk])
    parts = [q.reshape(nk, dk, cols), k.reshape(nk, dk, cols), v.reshape(nk, per_v, cols), z.reshape(nk, per_v, cols)]
    return np.concatenate(parts, axis=1).reshape(-1, cols)


def _hf_shape_of(ckpt, fam: Family, info, kind, names) -> tuple[int, ...]:
    """The HF shape of each of an item's tensors (one per expert when the GGUF stacks them)."""
    shape = info.shape[1:] if names[0][1] is not None else info.shape
    if kind == gguf.MODEL_TENSOR.ATTN_QKV and names[0][0].endswith("in_proj_qkvz.weight"):  # see _split_qkvz
        z = ckpt.tensors[info.name.replace("attn_qkv", "attn_gate")]
        shape = (info.shape[0] + z.shape[0], info.shape[1])
    if kind == gguf.MODEL_TENSOR.ATTN_KV_B and info.name.endswith("attn_k_b.weight"):
        v_b = ckpt.tensors[info.name.replace("attn_k_b", "attn_v_b")]
        shape = (info.shape[0] * (info.shape[2] + v_b.shape[1]), info.shape[1])
    if fam.fused_experts and kind in EXPERT_KINDS:
        shape = _fused_shape(info.shape, kind)
    return _linear_hf_shape(fam, kind, _hf_shape(fam, names[0][0], shape))


def _hf_whole(read, ckpt, fam: Family, spec, job) -> np.ndarray:
    """An item's GGUF tensor (read(info) -> float32 array) with every change llama.cpp's converter
    made undone but the split into HF tensors (experts) and HF's shape (see _hf_part)."""
    info, kind, names = job
    x = read(info)
    if kind == gguf.MODEL_TENSOR.ATTN_KV_B and info.name.endswith("attn_k_b.weight"):
        x = _merge_kv_b(x, read(ckpt.tensors[info.name.replace("attn_k_b", "attn_v_b")]))
    if kind == gguf.MODEL_TENSOR.ATTN_QKV and names[0][0].endswith("in_proj_qkvz.weight"):  # see _split_qkvz
        x = _regroup_qkvz(x, read(ckpt.tensors[info.name.replace("attn_qkv", "attn_gate")]), spec)
    if fam.fused_experts and kind in EXPERT_KINDS:
        x = _fuse_experts(
            x, kind, lambda: read(ckpt.tensors[info.name.replace("ffn_gate_exps", "ffn_up_exps")]), fam.fused_split
        )
    if _shifted(fam, kind, names[0][0]):
        x = x - np.float32(fam.norm_shift)
    if fam.permute_qk and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
        heads = spec.attention.heads if kind == gguf.MODEL_TENSOR.ATTN_Q else spec.attention.kv_heads
        x = from_gguf_order(x, heads or spec.attention.heads)
    return _linear_to_hf(x, kind, fam, spec, info)


def _hf_part(x: np.ndarray, xid, hf: str, shape, fam: Family, kind, spec) -> np.ndarray:
    """One HF tensor of an item: its expert's slice, transposed back (Conv1D) or reshaped back
    (squeezed / column / grouped tensors) to HF's shape."""
    part = x[xid] if xid is not None else x
    if fam.transposed(hf):
        return part.T
    # the same values in another shape: re-laid by the recipe, or size-1 dims llama.cpp's converter kept
    return part.reshape(shape) if _linear_relaid(fam, kind, spec) or part.shape != tuple(shape) else part


def _shifted(fam: Family, kind, hf_name: str) -> bool:
    """Stored as (1 + w) in the GGUF: the family's norms, less the ones its recipe leaves unshifted."""
    return bool(fam.norm_shift) and hf_name.endswith("norm.weight") and kind.name not in fam.recipe.convert.unshifted


def _linear_relaid(fam: Family, kind, spec) -> bool:
    """Whether the recipe re-lays this kind out between HF and GGUF (read whole, then undone)."""
    conv = fam.recipe.convert
    tiled = conv.tile_v_heads and spec.linear is not None and kind in V_HEAD_AXES
    return tiled or kind.name in (*conv.neg_exp, *conv.squeezed, *conv.column, *conv.grouped)


def _linear_to_hf(x: np.ndarray, kind, fam: Family, spec, info) -> np.ndarray:
    """Undo the recipe's value layout changes (the shape is restored by the caller): value heads
    tiled back to grouped per key head, A = -exp(A_log) back to A_log."""
    conv = fam.recipe.convert
    if conv.tile_v_heads and spec.linear is not None and kind in V_HEAD_AXES:
        x = reorder_v_heads(x, kind, spec, inverse=True)
    if kind.name in conv.neg_exp:
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.log(-x.astype(np.float32))
        if not np.isfinite(x).all():
            raise LlmarchError(
                f"tensor {info.name} holds values that are not -exp of a finite number (A < 0)", info.file
            )
    return x


KDA_CONVS = (gguf.MODEL_TENSOR.SSM_CONV1D_Q, gguf.MODEL_TENSOR.SSM_CONV1D_K, gguf.MODEL_TENSOR.SSM_CONV1D_V)


def _linear_hf_shape(fam: Family, kind, shape: tuple[int, ...]) -> tuple[int, ...]:
    """HF's shape of a kind whose size-1 dims llama.cpp's converter changed: a squeezed [C, K] conv
    is HF's [C, 1, K]; a column [n, 1] and a grouped [G, n / G] norm are HF's [n]."""
    conv = fam.recipe.convert
    if kind.name in conv.squeezed and len(shape) == 2:
        return (shape[0], 1, shape[1])
    if kind in KDA_CONVS and len(shape) == 4 and shape[0] == 1:  # KimiLinearModel writes [1, C, 1, K]
        return tuple(shape[1:])
    if kind.name in (*conv.column, *conv.grouped):
        return (math.prod(shape),)
    return shape


def _hf_shape(fam: Family, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[::-1]) if fam.transposed(hf_name) else tuple(shape)


class HFView:
    """A GGUF seen as the Hugging Face checkpoint `--to safetensors` writes from it: HF names and
    shapes (`tensors`, float32), each tensor computed from the GGUF on demand (`array`), so code
    that reads HF names (the runtime's linear-attention mixers) runs from the GGUF directly."""

    format = "safetensors"

    def __init__(self, ckpt, spec):
        self.path, self.files = ckpt.path, ckpt.files
        self._ckpt, self._spec = ckpt, spec
        self._fam = family_from_gguf(spec, ckpt.path)
        self.tensors: dict[str, TensorInfo] = {}
        self._where: dict[str, tuple] = {}
        for job in _gguf_items(ckpt, self._fam, spec.layers):
            info, kind, names = job
            shape = tuple(_hf_shape_of(ckpt, self._fam, info, kind, names))
            for hf, xid in names:
                self.tensors[hf] = TensorInfo(hf, "F32", shape, info.file, info.offset, math.prod(shape) * 4)
                self._where[hf] = (job, xid)
        self._last: tuple = (None, None)  # the last GGUF tensor undone: its experts are read one by one

    def array(self, hf_name: str) -> np.ndarray:
        job, xid = self._where[hf_name]
        if self._last[0] is not job:
            self._last = (job, _hf_whole(self._read, self._ckpt, self._fam, self._spec, job))
        part = _hf_part(self._last[1], xid, hf_name, self.tensors[hf_name].shape, self._fam, job[1], self._spec)
        return np.ascontiguousarray(part, dtype=np.float32)

    @staticmethod
    def _read(info) -> np.ndarray:
        buf = np.empty(info.nbytes, dtype=np.uint8)
        fd = os.open(info.file, os.O_RDONLY)
        try:
            _pread(fd, buf, info.offset)
        finally:
            os.close(fd)
        return dequantize(buf, Q[info.dtype], info.shape)
