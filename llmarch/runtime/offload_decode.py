"""One decode step for a model whose routed experts run on the host, with the GPU work between
two host round trips replayed as one CUDA graph.

Per MoE layer the step must leave the GPU once (the router's choice and the activations go to the
CPU kernel, the experts' sum comes back). Everything in between (the experts' sum added to the
residual, then the next layer's norm, attention, norm, router and shared expert) is fixed-shape
GPU work; eagerly it is ~60 launches per layer from Python, about as long as the CPU's share. So
each such segment is captured once and replayed: one launch per layer.

Pre-norm blocks only (the experts' sum must be the last thing added to the residual); other
placements, or a CPU device, run the same segments eagerly.
"""

from __future__ import annotations

import torch

from llmarch.runtime.offload import OffloadedExperts
from llmarch.runtime.ops.moe import MoE


class SegmentedDecoder:
    def __init__(self, model, cache, device, graphs: bool | None = None):
        self.model, self.cache, self.device = model, cache, device
        blocks = list(model.layers)
        self.cuts = [i for i, b in enumerate(blocks) if isinstance(b.mlp, MoE) and isinstance(b.mlp.experts, OffloadedExperts)]
        self.ok = bool(self.cuts) and all(b.attn_post_norm is None and b.ffn_post_norm is None for b in blocks) \
            and model.tied_quant is None and model.pos_embed is None \
            and not any(blocks[i].mlp.experts.hot_n for i in self.cuts)  # hot experts: the eager path
        # MLA and chunked attention slice their caches by the position on the host: eager segments
        from llmarch.runtime.ops.attention import Attention
        from llmarch.runtime.ops.llama4 import ChunkedAttention

        capturable = all(isinstance(b.attn, Attention) and not isinstance(b.attn, ChunkedAttention) for b in blocks)
        self.graphs = (device.type == "cuda" and capturable) if graphs is None else graphs
        d = model.spec.hidden_size
        dt = model.final_norm.weight.dtype
        k = model.spec.moe.experts_per_token if model.spec.moe else 0
        z = lambda *s, dtype=dt: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        self.ids, self.pos = z(1, 1, dtype=torch.long), z(1, dtype=torch.long)
        self.h, self.y = z(1, 1, d), z(1, 1, d)
        self.pack = z(1, 2 * k + d, dtype=torch.float32)
        self.logits = None
        self.k = k
        self.segs = [self._make(i) for i in range(len(self.cuts) + 1)]
        self.captured: list = []

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
                x = self.h + self.y
            for b in blocks[lo:hi]:
                x = b(x, self.pos, cache)
            if last:
                logits = m.head(x)
                if self.logits is None:
                    self.logits = torch.zeros_like(logits[:, -1])
                self.logits.copy_(logits[:, -1])
                return
            b = blocks[hi]
            h = x + b.attn(b.attn_norm(x), self.pos, cache)
            flat = b.ffn_norm(h).view(-1, h.shape[-1])
            moe = b.mlp
            idx, w = moe.router(flat)
            if moe.shared is not None:
                s = moe.shared(flat)
                if moe.shared_gate is not None:
                    s = torch.sigmoid(moe.shared_gate(flat)) * s
                h = h + s.view_as(h)
            self.h.copy_(h)
            self.pack.copy_(torch.cat([idx.float(), w.float(), flat.float()], dim=1))
        return seg

    def _host(self, i: int) -> None:
        moe = self.model.layers[self.cuts[i]].mlp
        p = self.pack.cpu()  # waits for the segment: the one sync per layer
        k = self.k
        y = moe.experts._cpu(p[:, 2 * k:].contiguous(), p[:, :k].long(), p[:, k:2 * k], moe.act, moe.weight_input)
        self.y.copy_(y.view_as(self.y).to(self.y.dtype))

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                for seg in self.segs:  # warm-up: K/V written at slot pos only, rewritten by the real step
                    seg()
        torch.cuda.current_stream().wait_stream(side)
        for seg in self.segs:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                seg()
            self.captured.append(g)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        self.ids.copy_(ids.view(1, 1))
        self.pos.fill_(pos)
        if self.graphs and not self.captured:
            self._capture()
        run = [g.replay for g in self.captured] if self.graphs else self.segs
        for i, seg in enumerate(run):
            seg()
            if i < len(self.cuts):
                self._host(i)
        return self.logits


def attach_decoder(gen) -> bool:
    """Route a Generator's eager decode steps through a SegmentedDecoder when the model offloads experts."""
    dec = SegmentedDecoder(gen.model, gen.cache, gen.device)
    if not dec.ok:
        return False
    gen._step_eager = dec.step  # the Generator's eager step, swapped per instance (no CUDA graph of its own)
    gen.use_graph = False
    return True
