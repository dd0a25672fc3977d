"""Where the routed experts of each MoE layer live, whether that fits, and the store that holds them.

--experts gpu|cpu|disk   where the routed experts live (default: gpu when they fit, else cpu)
--expert-bits 16|8|4     16: the model dtype; 8: int8, one fp16 scale per 64 inputs;
                         4: int4, fp16 scale + min per 64 inputs (4.5 bits per weight);
                         not given, on the CPU, for gpt-oss's MXFP4 experts: kept as shipped
                         (4.25 bits per weight), for a GGUF's Q8_0 / Q4_0 / MXFP4 / Q4_K /
                         Q5_K / Q6_K experts: its blocks read as stored from the file's memory
                         map, each tensor in its own type
--gpu-experts N          the N most used experts of each layer (counted while running) also
                         get a float copy on the GPU and are computed there
"""

from __future__ import annotations

import atexit
import mmap
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llmarch.errors import LlmarchError
from llmarch.runtime.experts.disk import DiskCache
from llmarch.runtime.experts.formats import ExpertFormat, G
from llmarch.runtime.experts.host import OffloadedExperts
from llmarch.runtime.experts.kernel import kernel_activation
from llmarch.runtime.experts.stores import QuantGPUExperts
from llmarch.runtime.ops.moe import MoE


@dataclass
class Placement:
    experts: str = "gpu"  # gpu | cpu | disk
    format: ExpertFormat = ExpertFormat.FLOAT
    gpu_experts: int = 0
    disk_dir: str | None = None
    disk_cache: DiskCache | None = None


def store_factory(place: Placement, dtype, device):
    def make(moe: MoE, gate_up, down, biases, stored=None):
        if place.experts != "gpu" and place.format.quantized:
            kernel_activation(moe.act)  # one line now if the kernel lacks the experts' activation
        if place.format.ggml_type:  # a GGUF's blocks: (gate, up, down), (gate_up, None, down) or (up, None, down)
            from llmarch.runtime.experts import gguf_blocks

            if stored is None:
                raise LlmarchError(
                    f"layer {moe.index}: experts are not GGUF blocks like the other layers'; use --expert-bits 16"
                )
            gu, up, dn, mm = gguf_blocks.views(stored, own_map=place.experts == "disk")
            return OffloadedExperts.from_quantized(
                moe, (gu, None, dn, None), place, dtype, biases, up=up, mapped=mm, formats=gguf_blocks.formats(stored)
            )
        mxfp4 = stored
        if (
            place.format is ExpertFormat.MXFP4
        ):  # blocks [E, rows, K/32, 16] as rows of K/2 bytes, e8m0 scales [E, rows, K/32]
            if moe.d % G or moe.inter % G:
                raise LlmarchError(
                    f"MXFP4 experts on the CPU need widths that are multiples of {G} (hidden {moe.d}, "
                    f"expert {moe.inter}); use --expert-bits 16"
                )
            if mxfp4 is None:
                raise LlmarchError(
                    f"layer {moe.index}: experts are not MXFP4 like the other layers'; use --expert-bits 16"
                )
            gub, gus, dnb, dns = mxfp4
            parts = (gub.reshape(*gub.shape[:2], -1), gus, dnb.reshape(*dnb.shape[:2], -1), dns)
            return OffloadedExperts.from_quantized(moe, parts, place, dtype, biases)
        if place.experts != "gpu":
            return OffloadedExperts(moe, gate_up, down, biases, place, dtype)
        if place.format.quantized:
            return QuantGPUExperts(gate_up, down, biases, place.format, dtype, device)
        return moe.experts.load(gate_up, down, biases, dtype, device)

    # read_moe hands over the stored blocks instead of dequantizing
    make.keeps_stored = place.format if place.format.stored else None
    return make


def stored_format(ckpt, spec) -> ExpertFormat | None:
    """The checkpoint's own expert format where the CPU kernel reads it as it is: gpt-oss's MXFP4
    safetensors, a GGUF's Q8_0 / Q4_0 / MXFP4 / K-quant blocks."""
    from llmarch.runtime.experts.gguf_blocks import block_format, refuse_unreadable
    from llmarch.runtime.moe_names import has_mxfp4_experts

    refuse_unreadable(ckpt)
    return ExpertFormat.MXFP4 if has_mxfp4_experts(ckpt) else block_format(ckpt, spec)


GiB = 2**30


def _host_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def expert_bytes(spec, fmt: ExpertFormat, dtype_bytes: int = 2) -> tuple[int, int]:
    """(bytes of all routed experts stored in fmt, bytes of everything else run loads at the model
    dtype): the fingerprint's parameters by part, as `llmarch fit` sizes them (vision towers and
    MTP layers, which run does not load, left out)."""
    from llmarch.plan.memory import param_parts, text_parts

    parts = text_parts(param_parts(spec))
    routed = parts.pop("routed_experts")
    return int(routed * fmt.bytes_per_weight(dtype_bytes)), int(sum(parts.values()) * dtype_bytes)


def plan(
    spec,
    device: torch.device,
    dtype,
    experts: str | None,
    bits: int | None,
    gpu_experts: int = 0,
    cache_gib: float = 2.0,
    disk_dir: str | None = None,
    stored: ExpertFormat | None = None,
) -> Placement:
    """Check the options and that the placement fits; the default puts experts on the GPU when they fit.
    stored: the format the kernel reads the checkpoint's experts in as they are (stored_format);
    without --expert-bits they stay so on the CPU/disk."""
    fmt = ExpertFormat.from_bits(16 if bits is None else bits)
    if experts not in (None, "gpu", "cpu", "disk"):
        raise LlmarchError(f"--experts must be gpu, cpu or disk, got {experts!r}")
    if gpu_experts < 0:
        raise LlmarchError(f"--gpu-experts must be >= 0, got {gpu_experts}")
    if not cache_gib >= 0:
        raise LlmarchError(f"--expert-cache-gib must be >= 0, got {cache_gib}")
    dbytes = torch.empty(0, dtype=dtype).element_size()
    routed, dense = expert_bytes(spec, fmt, dbytes)
    on_gpu = device.type == "cuda"
    dev_free = torch.cuda.mem_get_info(device)[0] if on_gpu else _host_available()
    host_free = _host_available()
    where = "the GPU" if on_gpu else "host RAM"
    if experts is None:
        experts = "gpu" if routed + dense < 0.9 * dev_free else "cpu"
    if stored is not None and bits is None and experts != "gpu":
        fmt = stored
        routed = expert_bytes(spec, fmt, dbytes)[0]
    hot = gpu_experts * routed // max(spec.moe.experts, 1)
    need_dev = dense + (routed if experts == "gpu" else hot)
    if need_dev > dev_free:
        fits = [
            f.option
            for f in (ExpertFormat.INT8, ExpertFormat.INT4)
            if f.bytes_per_weight(dbytes) < fmt.bytes_per_weight(dbytes)
            and expert_bytes(spec, f, dbytes)[0] + dense < dev_free
        ]
        alt = f"; would fit: --experts gpu {' or '.join(fits)}" if fits and experts == "gpu" else ""
        if experts == "gpu" and dense < dev_free:
            alt += f"; or --experts cpu ({routed / GiB:.1f} GiB of experts in host RAM, {host_free / GiB:.1f} GiB free)"
        raise LlmarchError(
            f"not enough memory for --experts {experts} {fmt.option}: needs {need_dev / GiB:.1f} GiB "
            f"on {where} (dense {dense / GiB:.1f} GiB + experts), {dev_free / GiB:.1f} GiB free{alt}"
        )
    if experts == "cpu" and on_gpu and routed > host_free:
        raise LlmarchError(
            f"not enough host RAM for --experts cpu ({fmt.value} experts): experts need {routed / GiB:.1f} GiB, "
            f"{host_free / GiB:.1f} GiB free; try --expert-bits 4 or --experts disk"
        )
    cache = DiskCache(int(cache_gib * GiB)) if experts == "disk" and hasattr(mmap, "MADV_DONTNEED") else None
    folder = None
    if experts == "disk":  # one fresh folder per run inside --expert-dir, removed at exit
        try:
            if disk_dir is not None:
                Path(disk_dir).mkdir(parents=True, exist_ok=True)
            folder = tempfile.mkdtemp(prefix="llmarch-experts-", dir=disk_dir)
        except OSError as e:
            raise LlmarchError(
                f"--expert-dir: cannot create a folder for the expert files: {e.strerror}",
                disk_dir or tempfile.gettempdir(),
            ) from e
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Placement(experts, fmt, gpu_experts, folder, cache)


def attach(model, place: Placement, dtype, device) -> None:
    for m in model.modules():
        if isinstance(m, MoE):
            m.store_factory = store_factory(place, dtype, device)
