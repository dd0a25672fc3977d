"""One decode step for a model whose routed experts run on the host, the GPU work between two
host round trips replayed as CUDA graphs.

Per MoE layer the step must leave the GPU once (the router's choice and the activations go to the
CPU kernel, the experts' sum comes back). Everything in between (the experts' sum added to the
residual, then the next layer's norm, attention, norm, router and shared expert) is fixed-shape
GPU work: a segment, captured once as a CUDA graph and replayed (one launch per layer instead of
~40). Between two segments Python copies [ids, weights, x] into pinned host memory, calls
moe_cpu.c's moe_decode on a prepared context (no per-call argument marshalling: the round trip
went from ~0.2 ms to ~0.06 ms) and copies the sum back; the copies ride inside the graphs, and a
shared expert is queued after the copy to the host, behind an event the host waits on, so it runs
while the CPU computes; so is the GPU's share of the routed experts (gpu_share.py: the first
router slots, read from host memory over PCIe), the CPU kernel taking the other slots from the
pack. `--compile` fuses each segment first. 16-bit experts take the torch path.
moe_step (moe_cpu.c) drives a whole step from C; with early launch it queues each next segment while
the current one runs, behind a stream wait on a flag the host raises after the layer's kernel.
Measured and dropped: the whole step as one graph with the kernel as CUDA host nodes
(cuLaunchHostFunc) was slower on the H100 machine (52 vs 34 ms per token): the driver's
host-callback hand-off costs more than the Python round trip it replaces.

Pre-norm blocks only (the experts' sum must be the last thing added to the residual); other
placements, or a CPU device, run the same segments eagerly.
"""

from __future__ import annotations

import ctypes
import os

import torch

from llmarch.errors import LlmarchError
from llmarch.runtime.experts.host import OffloadedExperts
from llmarch.runtime.experts.kernel import (
    DecodeCtx,
    StepPlan,
    cpu_kernel,
    kernel_activation,
    kernel_scratch,
    pointer_array,
    ptr,
)
from llmarch.runtime.experts.stores import ResidentExperts
from llmarch.runtime.ops.moe import MoE


def capturable_mixer(mixer) -> bool:
    """A mixer whose one-token step can be a CUDA graph: fixed shapes, no host read, its cache or
    recurrent state updated in place. Attention (full / sliding rings), MLA (with a sparse-attention
    indexer too: its top-k and gather are of static size), and the linear mixers (Gated DeltaNet,
    KDA, Mamba-2, short convolution: conv window and recurrent matrix written with
    copy_/mul_/add_). Chunked attention slices its cache by the position read on the host;
    DeepSeek V4's compressed attention is not checked: eager."""
    from llmarch.runtime.ops.attention import Attention
    from llmarch.runtime.ops.chunked_attention import ChunkedAttention
    from llmarch.runtime.ops.gated_deltanet import GatedDeltaNet
    from llmarch.runtime.ops.kda import KimiDeltaAttention
    from llmarch.runtime.ops.mamba2 import Mamba2
    from llmarch.runtime.ops.mla import MLAttention
    from llmarch.runtime.ops.short_conv import ShortConv

    if mixer is None:
        return True
    if isinstance(mixer, ChunkedAttention):
        return False
    return isinstance(mixer, (Attention, MLAttention, GatedDeltaNet, KimiDeltaAttention, Mamba2, ShortConv))


def whole_step_capturable(model) -> bool:
    """A MoE / MLA model's whole decode step as one CUDA graph (the Generator's): every mixer
    capturable and every routed-expert store resident on the device, whose decode path has no host
    sync (stores.routed_static). Offloaded, dequantizing and hot-expert stores read the routing on
    the host."""
    for b in model.layers:
        if not capturable_mixer(b.attn):
            return False
        ffn = getattr(b.mlp, "moe", b.mlp)  # a dense MLP beside the experts (Gemma 4) holds them as .moe
        if isinstance(ffn, MoE) and type(ffn.experts) is not ResidentExperts:
            return False
    return True


STEP_LOOPS = ("python", "c")
# moe_step by default: on the H200 machine (2026-12-01 23:59 UTC, Qwen3-30B-A3B shape, int4, --compile) the
# next graph's launch came 16.7 us after a layer's kernel against ~25 us for torch's replay call from
# Python, and decode was 1.07-1.38x per alternated round (3 rounds), same tokens in the GPU tests
STEP_LOOP = "c"


def step_loop_choice() -> str:
    """LLMARCH_MOE_STEP_LOOP: who drives a captured step's segments and host calls, `c` (moe_cpu.c's
    moe_step: one call from Python per token) or `python` (a replay, an event wait and a kernel call
    per layer from Python)."""
    loop = os.environ.get("LLMARCH_MOE_STEP_LOOP", STEP_LOOP)
    if loop not in STEP_LOOPS:
        raise LlmarchError(f"LLMARCH_MOE_STEP_LOOP={loop!r}: expected one of {', '.join(STEP_LOOPS)}")
    return loop


def decode_context(st: OffloadedExperts, moe, k: int, pack_h, out_h) -> tuple[DecodeCtx, tuple]:
    """moe_decode's context for one layer's store (moe: its MoE, for the activation and where the
    router weight applies), reading pack_h and writing out_h; with its own scratch (the store's grows,
    and moves, in prefill), which the caller holds."""
    scratch = kernel_scratch(st.d, st.inter, k)
    ctx = DecodeCtx(
        st.kernel_bits,
        k,
        st.d,
        st.inter,
        kernel_activation(moe.act),
        1 if moe.gated else 0,
        1 if moe.weight_input else 0,
        moe.act.alpha,
        moe.act.limit,
        ptr(pack_h),
        ptr(out_h),
        ptr(st.gu),
        ptr(st.up),
        ptr(st.dn),
        ptr(st.gu_s),
        ptr(st.dn_s),
        ptr(st.gu_b),
        ptr(st.dn_b),
        *(ptr(scratch[j]) for j in (0, 3, 1, 2, 4, 5)),
    )
    return ctx, scratch


# moe_step's early launch (the next segment queued behind a stream wait on a flag the host raises after
# the kernel): off until measured faster on the device
EARLY_LAUNCH = False


def flag_address(flag: torch.Tensor | None) -> int | None:
    """The host address of early launch's flag for moe_step's plan (None: no early launch). Not
    `flag and ...`: the truth of a one-element tensor is its value."""
    return None if flag is None else flag.data_ptr()


def early_launch_choice() -> bool:
    """LLMARCH_NO_MOE_EARLY_LAUNCH=1 off, =0 on, unset: EARLY_LAUNCH (read once, at decoder build)."""
    from llmarch.runtime.gguf_cuda import switched_on

    return switched_on("LLMARCH_NO_MOE_EARLY_LAUNCH", EARLY_LAUNCH)


class SegmentedDecoder:
    def __init__(self, model, cache, device, graphs: bool | None = None, compile: bool = False):
        self.model, self.cache, self.device = model, cache, device
        self.step_loop = step_loop_choice()  # read once: a benchmark may switch the attribute per round
        self.early_launch = early_launch_choice()  # the C loop's (see set_early_launch)
        self.plan = None
        self._early: tuple | None = None  # what early launch needs, once the plan is made (_early_flag)
        blocks = list(model.layers)
        self.cuts = [
            i for i, b in enumerate(blocks) if isinstance(b.mlp, MoE) and isinstance(b.mlp.experts, OffloadedExperts)
        ]
        self.ok = (
            bool(self.cuts)
            and all(b.attn_post_norm is None and b.ffn_post_norm is None for b in blocks)
            and model.pos_embed is None
            and not any(blocks[i].mlp.experts.hot_n for i in self.cuts)
        )  # hot experts: the eager path
        capturable = all(capturable_mixer(b.attn) for b in blocks)
        self.graphs = (device.type == "cuda" and capturable) if graphs is None else graphs
        d = model.spec.hidden_size
        dt = model.final_norm.weight.dtype
        k = model.spec.moe.experts_per_token if model.spec.moe else 0
        z = lambda *s, dtype=dt: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        self.ids, self.pos = z(1, 1, dtype=torch.long), z(1, dtype=torch.long)
        self.h, self.y = z(1, 1, d), z(1, 1, d, dtype=torch.float32)
        self.logits = None
        self.k = k
        self.stores = [blocks[i].mlp.experts for i in self.cuts]
        self.native = self.ok and all(st.format.quantized for st in self.stores) and 0 < k <= 256
        # the router slots the GPU computes itself (gpu_share.py), and those left to the CPU kernel
        self.shares, self.share_note = self._gpu_shares(device)
        self.slots = self.shares[0].slots if self.shares else 0
        self.kc = k - self.slots
        self.pack = z(1, 2 * self.kc + d, dtype=torch.float32)
        self.share_ids, self.share_w = z(1, self.slots, dtype=torch.long), z(1, self.slots, dtype=torch.float32)
        self.segs = [self._make(i) for i in range(len(self.cuts) + 1)]
        self.shared = [self._make_shared(i) for i in range(len(self.cuts) + 1)]
        if compile and self.graphs:
            self._compile_segments()
        self.captured: list = []
        self.copies_in_graph = False
        if self.native:
            self._native_contexts(device)

    def _compile_segments(self) -> None:
        """torch.compile each segment (fusing its ~40 small kernels) before it is captured. The segments
        share one code object with different closure cells, so dynamo keeps one entry per layer: each
        decoder raises the limits by its own count (a benchmark builds several on one model)."""
        import torch._dynamo.config as dyn

        for name in (
            "recompile_limit",
            "cache_size_limit",
            "accumulated_recompile_limit",
            "accumulated_cache_size_limit",
        ):
            if hasattr(dyn, name):
                setattr(dyn, name, getattr(dyn, name) + 2 * len(self.segs) + 8)
        self.segs = [torch.compile(seg, dynamic=False) for seg in self.segs]
        self.shared = [f and torch.compile(f, dynamic=False) for f in self.shared]

    def _gpu_shares(self, device) -> tuple[list, str | None]:
        """The layers' GPU shares of their routed experts (gpu_share.layer_shares) and the run's note;
        none off a CUDA device, without the native kernel, or without graphs: the eager step waits for
        the whole stream before the CPU kernel, so the share would add to the step instead of
        running beside the kernel."""
        if not (self.native and device.type == "cuda" and self.graphs):
            return [], None
        from llmarch.runtime.experts import gpu_share

        moes = [self.model.layers[i].mlp for i in self.cuts]
        return gpu_share.layer_shares(self, self.stores, moes, self.k, device)

    def _native_contexts(self, device) -> None:
        """One moe_decode context per offloaded layer; pack/out in pinned host memory on a GPU."""
        if device.type == "cuda":
            self.pack_h, self.out_h = (
                self.pack.new_zeros(self.pack.numel(), device="cpu").pin_memory(),
                torch.zeros(self.y.numel(), pin_memory=True),
            )
        else:  # the kernel reads and writes the segment's own buffers
            self.pack_h, self.out_h = self.pack.view(-1), self.y.view(-1)
        self.lib = cpu_kernel()
        self.ctxs, self.scratch = [], []
        for i, st in zip(self.cuts, self.stores):
            ctx, scratch = decode_context(st, self.model.layers[i].mlp, self.kc, self.pack_h, self.out_h)
            self.ctxs.append(ctx)
            self.scratch.append(scratch)
        self.ctx_ptrs = [ctypes.cast(ctypes.pointer(c), ctypes.c_void_p) for c in self.ctxs]
        self.bytes_per_step = [self.k * st.expert_bytes() for st in self.stores]

    def _make(self, i: int):
        m, blocks, cache = self.model, self.model.layers, self.cache
        lo = 0 if i == 0 else self.cuts[i - 1] + 1
        last = i == len(self.cuts)
        hi = len(blocks) if last else self.cuts[i]

        def seg():
            if i == 0:
                cache.prepare(self.pos, None)
                x = m.embed_ids(self.ids, self.pos)
            else:
                x = self.h + self.y.to(self.h.dtype)
            for b in blocks[lo:hi]:
                x = b(x, self.pos, cache)
            if last:
                logits = m.head(x)
                if self.logits is None:
                    self.logits = torch.zeros_like(logits[:, -1])
                self.logits.copy_(logits[:, -1])
                return
            b = blocks[hi]
            h = x if b.attn is None else x + b.attn(b.attn_norm(x), self.pos, cache)  # FFN-only layers (Nemotron-H)
            flat = b.ffn_norm(h).view(-1, h.shape[-1])
            moe = b.mlp
            idx, w = moe.router(flat)
            self.h.copy_(h)
            s = self.slots  # the first slots go to the GPU share, the others to the CPU
            if s:
                self.share_ids.copy_(idx[:, :s])
                self.share_w.copy_(w[:, :s])
            self.pack.copy_(torch.cat([idx[:, s:].float(), w[:, s:].float(), flat.float()], dim=1))

        return seg

    def _make_shared(self, i: int):
        """The shared expert of the layer that segment i ends at, as its own step: on a GPU it is queued
        after the copy to the host, so it runs while the CPU computes the routed experts."""
        if i == len(self.cuts) or self.model.layers[self.cuts[i]].mlp.shared is None:
            return None
        moe, k = self.model.layers[self.cuts[i]].mlp, self.kc

        def shared():
            flat = self.pack[:, 2 * k :].to(self.h.dtype)  # the normed input, exact (float32 holds bf16/fp16)
            s = moe.shared(flat)
            if moe.shared_gate is not None:
                s = torch.sigmoid(moe.shared_gate(flat)) * s
            self.h.add_(s.view_as(self.h))

        return shared

    def _share(self, i: int) -> None:
        """Layer i's GPU share of its routed experts, queued where the shared expert is: after the copy
        that wakes the host. Never compiled: its kernels take host addresses."""
        if self.shares and i < len(self.cuts):
            self.shares[i](self.share_ids, self.share_w, self.pack[:, 2 * self.kc :], self.h)

    def _host(self, i: int) -> None:
        """Layer i's routed experts, called from Python: the one sync per layer."""
        if not self.native:
            moe, k = self.model.layers[self.cuts[i]].mlp, self.k
            p = self.pack.cpu()
            y = moe.experts.host_compute(
                p[:, 2 * k :].contiguous(), p[:, :k].long(), p[:, k : 2 * k], moe.act, moe.weight_input
            )
            self.y.copy_(y.view_as(self.y))
            return
        if self.device.type == "cuda":
            self.pack_h.copy_(self.pack.view(-1), non_blocking=True)
            torch.cuda.current_stream().synchronize()
        self.lib.moe_decode(self.ctx_ptrs[i])
        if self.device.type == "cuda":
            self.y.view(-1).copy_(self.out_h, non_blocking=True)

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        saved = self.cache.save_linear()  # the warm-up steps advance recurrent state: undone below
        with torch.cuda.stream(side):
            for _ in range(2):
                for i, seg in enumerate(self.segs):  # warm-up: K/V written at slot pos only, rewritten by the real step
                    seg()
                    if self.shared[i]:
                        self.shared[i]()
                    self._share(i)
                    if i < len(self.cuts):
                        self._host(i)
        torch.cuda.current_stream().wait_stream(side)
        self.cache.restore_linear(saved)
        # the pinned copies ride in the graphs (two calls less per layer); an event after the copy to
        # the host lets the CPU start while the graph's tail (the shared expert) still runs
        self.copies_in_graph = self.native
        self.ready = [torch.cuda.Event(external=True) for _ in self.cuts]
        for i, seg in enumerate(self.segs):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                if self.copies_in_graph and i > 0:
                    self.y.view(-1).copy_(self.out_h, non_blocking=True)
                seg()
                if self.copies_in_graph and i < len(self.cuts):
                    self.pack_h.copy_(self.pack.view(-1), non_blocking=True)
                    self.ready[i].record()
                if self.shared[i]:
                    self.shared[i]()
                self._share(i)
            self.captured.append(g)
        if self.copies_in_graph and hasattr(self.captured[0], "raw_cuda_graph_exec"):
            self._plan_step()

    def _plan_step(self) -> None:
        """moe_step's plan: the graphs' executables, the ready events, the layers' contexts and the CUDA
        driver's launch and event-wait calls (libcuda, the library torch's runtime calls into)."""
        drv = ctypes.CDLL("libcuda.so.1")
        addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
        self._plan_arrays = (
            pointer_array([g.raw_cuda_graph_exec() for g in self.captured]),
            pointer_array([e.cuda_event for e in self.ready]),
            pointer_array([ctypes.addressof(c) for c in self.ctxs]),
        )
        self.plan = StepPlan(
            len(self.captured),
            addr(drv.cuGraphLaunch),
            addr(drv.cuEventSynchronize),
            None,
            *(ctypes.addressof(a) for a in self._plan_arrays),
        )
        self.plan_ptr = ctypes.cast(ctypes.pointer(self.plan), ctypes.c_void_p)
        self._moe_step = self.lib.moe_step  # the contexts' kernel build (a benchmark may swap self.lib)
        self._early = self._early_flag(drv)
        self.set_early_launch(self.early_launch)

    def _early_flag(self, drv) -> tuple | None:
        """(cuStreamWaitValue32's address, the pinned flag, its device address) for moe_step's early
        launch, or None where the driver has no such call or cannot map the flag."""
        wait_value = getattr(drv, "cuStreamWaitValue32_v2", None) or getattr(drv, "cuStreamWaitValue32", None)
        get_dev = getattr(drv, "cuMemHostGetDevicePointer_v2", None)
        if wait_value is None or get_dev is None:
            return None
        flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        dev = ctypes.c_uint64()
        if get_dev(ctypes.byref(dev), ctypes.c_void_p(flag.data_ptr()), ctypes.c_uint(0)) != 0:
            return None
        return ctypes.cast(wait_value, ctypes.c_void_p).value, flag, dev.value

    def set_early_launch(self, on: bool) -> None:
        """moe_step's early launch on or off (where the driver allows it); a benchmark alternates it."""
        self.early_launch = bool(on and self._early is not None)
        if self.plan is None:
            return
        wait_value, flag, dev = self._early if self.early_launch else (None, None, 0)
        self.plan.wait_value, self.plan.flag, self.plan.flag_dev = wait_value, flag_address(flag), dev

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        self.ids.copy_(ids.view(1, 1))
        self.pos.fill_(pos)
        if self.graphs and not self.captured:
            self._capture()
        if self.native:  # what moe_decode reads: k experts per layer (the Python path counts its own)
            for st, n in zip(self.stores, self.bytes_per_step):
                st.touched(n)
        if self.graphs and self.copies_in_graph and self.plan is not None and self.step_loop == "c":
            self.plan.stream = torch.cuda.current_stream().cuda_stream or None
            rc = self._moe_step(self.plan_ptr)
            if rc:
                raise RuntimeError(f"decode step: segment {rc // 1000 - 1}'s CUDA call failed (CUresult {rc % 1000})")
            return self.logits
        if self.graphs and self.copies_in_graph:
            last, decode, ctx = len(self.cuts), self.lib.moe_decode, self.ctx_ptrs
            for i, g in enumerate(self.captured):
                g.replay()
                if i < last:
                    self.ready[i].synchronize()
                    decode(ctx[i])
            return self.logits
        run = [g.replay for g in self.captured] if self.graphs else self.segs
        for i, seg in enumerate(run):
            seg()
            if not self.graphs:  # (a graph holds its shared expert and GPU share)
                if self.shared[i]:
                    self.shared[i]()
                self._share(i)
            if i < len(self.cuts):
                self._host(i)
        return self.logits


def attach_decoder(gen) -> bool:
    """Route a Generator's eager decode steps through a SegmentedDecoder when the model offloads experts."""
    dec = SegmentedDecoder(gen.model, gen.cache, gen.device, compile=gen.compile)
    if not dec.ok:
        return False
    gen._step_eager = dec.step  # the Generator's eager step, swapped per instance (no CUDA graph of its own)
    gen.use_graph = False
    if dec.share_note:
        gen.rt.notes.append(dec.share_note)
    return True
