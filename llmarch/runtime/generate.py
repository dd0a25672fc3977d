"""Token generation: prefill, then one-token decode steps over the static KV cache.

On CUDA the decode step is captured once into a CUDA graph (optionally after torch.compile has
fused its elementwise ops): small models are bound by kernel launches, not bandwidth, otherwise.
A model whose step takes part of its input from the host (per-layer embedding rows in host RAM or
on disk) names that input `model.graph_inputs`: the graph reads it from a static device buffer,
which `graph_inputs.stage(ids)` fills with the sampled token's part before each replay. Such a
step is captured as two graphs when the model splits it (`model.start`, everything before that
input is first read; `model.finish`, the rest): greedy decode queues a step's first graph right
behind the previous step, its token taken on the device, so it runs while the host waits for the
token and stages its part; only the second graph waits for the host.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from llmarch.errors import LlmarchError
from llmarch.runtime import prefill_graph
from llmarch.runtime.generate_types import Result, Sampling
from llmarch.runtime.kv_cache import KVCache

PREFILL_CHUNK = 512  # bounds the prefill activations; rings handle any chunk length


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> ids [B, 1]."""
    if not s.temperature or s.temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and 0 < s.top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > s.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(
        probs.cpu() if gen is not None and gen.device.type == "cpu" else probs, 1, generator=gen
    ).to(logits.device)


def _rows(V: int) -> int | None:
    """A divisor of V near its square root (64..4096), to split one long reduction into rows."""
    root = V**0.5
    found = [d for d in range(64, min(V, 4096) + 1) if V % d == 0]
    return min(found, key=lambda d: abs(d - root)) if found else None


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """logits [1, V] -> argmax ids [1, 1], the first of equal maxima as argmax gives. Inside a
    captured decode step: one argmax over V = 128k values runs as a single long reduction (29 us of
    a ~1 ms Llama-3.2-1B step on an H200); split into rows, the per-row maxima and the best row are
    two short parallel reductions (the best row is the first holding the maximum, and its first
    maximum is the first overall)."""
    V = logits.shape[-1]
    rows = _rows(V) if logits.shape[0] == 1 else None
    if rows is None:
        return logits.argmax(dim=-1, keepdim=True)
    best, where = logits.reshape(rows, V // rows).max(dim=-1)
    row = best.argmax()
    # gather, not where[row]: indexing by a 0-dim tensor reads it on the host (a sync), which a
    # CUDA graph capture refuses ("operation not permitted when stream is capturing")
    return (row * (V // rows) + where.gather(0, row.view(1))).view(1, 1)


class Generator:
    def __init__(self, rt, max_seq: int, cuda_graph: bool | None = None, compile: bool = False):
        spec = rt.spec
        a = spec.attention
        self.rt, self.model, self.device, self.max_seq = rt, rt.model, rt.device, max_seq
        self.cache = KVCache(
            spec.schedule,
            max_seq,
            a.kv_heads,
            a.head_dim,
            a.v_head_dim or a.head_dim,
            rt.dtype,
            rt.device,
            linear=spec.linear,
        )
        self.model.setup(max_seq, rt.device, rt.dtype)
        self.use_graph = (rt.device.type == "cuda") if cuda_graph is None else cuda_graph
        self.compile = compile
        self.graph = None  # the captured step (its second part when split)
        self.graph_start = None  # the first part of a split step (see the docstring)
        self.staged = getattr(self.model, "graph_inputs", None)  # host-side step input (see the docstring)
        # on the CPU, a model whose every layer the C step runs decodes each token in one C call
        self.cpu_step = None
        self.prefill_graphs = None  # one-chunk prompts replayed from CUDA graphs (prefill_graph.py)
        if self.use_graph and prefill_graph.usable(spec, self.cache, self.model, rt.device):
            self.prefill_graphs = prefill_graph.PrefillGraphs(self.model, self.cache, rt.device)
        if rt.device.type == "cpu" and not self.use_graph:
            from llmarch.runtime.cpu_decode import plan

            self.cpu_step = plan(self.model, self.cache, spec)

    # ---------------------------------------------------------------- decode step
    def _step_eager(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if self.cpu_step is not None:
            return self.cpu_step(ids, pos)
        p = torch.tensor([pos], device=self.device)
        return self.model(ids, p, self.cache, limit=pos + 1)[:, -1]

    def _capture(self, pos: int) -> None:
        """Capture model(ids, pos) for one token with static buffers; replay for every later step.

        Warm-up runs write garbage K/V at slot `pos` only, which the real step at `pos` overwrites
        before anything reads it (in a ring that slot held a position already outside the window).
        """
        split = self.staged is not None and hasattr(self.model, "start") and hasattr(self.model, "finish")
        parts = (self.model.start, self.model.finish) if split else (self.model,)
        if self.compile:
            import torch._inductor.config as inductor

            inductor.coordinate_descent_tuning = True  # tunes the fused norm/rope/softmax kernels (gpt-fast does too)
            parts = tuple(torch.compile(f, dynamic=False, fullgraph=False) for f in parts)
        self.fn = self.model if split else parts[0]  # the whole step, callable outside the graph (profiling)
        self.g_ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.g_pos = torch.full((1,), pos, dtype=torch.long, device=self.device)

        def step() -> torch.Tensor:
            if not split:
                return parts[0](self.g_ids, self.g_pos, self.cache, limit=None)
            return parts[1](self.g_ids, self.g_pos, self.cache, *self.g_mid)

        def first() -> None:
            if split:  # start's outputs stay where the second graph reads them
                self.g_mid = parts[0](self.g_ids, self.g_pos, self.cache, limit=None)

        saved = self.cache.save_linear()  # the warm-up steps below advance recurrent state: undo them
        staged = self.staged.captured() if self.staged is not None else contextlib.nullcontext()
        with staged:  # the host-side input read from its static buffer, in warm-up and capture alike
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    first()
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            if split:
                self.graph_start = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph_start):
                    first()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.g_out = step()[:, -1]
                self.g_next = greedy_choice(self.g_out)  # the greedy choice, inside the graph
        self.cache.restore_linear(saved)

    def _step_graph(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if self.graph is None:
            self._capture(pos)
        self.g_ids.copy_(ids)
        self.g_pos.fill_(pos)
        if self.graph_start is not None:
            self.graph_start.replay()
        self.graph.replay()
        return self.g_out

    def _greedy_pipelined(self, first: torch.Tensor, pos: int, max_tokens: int, eos_ids: set[int], on_token):
        """Greedy decode with graph replays queued one step ahead of the host: step k+1 is on the
        GPU while the host reads token k (one pinned copy + event per step), so the GPU never waits
        for Python. A step computed past EOS only writes a cache slot nobody reads."""
        out = [int(first.item())]
        if on_token:
            on_token(out[0])
        if out[0] in eos_ids:
            return out, "eos"
        host = torch.empty(2, 1, dtype=torch.long, pin_memory=True)
        events = [torch.cuda.Event(), torch.cuda.Event()]
        self.g_ids.copy_(first.view(1, 1))
        self.g_pos.fill_(pos)

        def launch(i: int) -> None:
            self.graph.replay()
            host[i % 2].copy_(self.g_next[0], non_blocking=True)
            events[i % 2].record()
            self.g_ids.copy_(self.g_next)  # queued behind the replay: the next step's input
            self.g_pos.add_(1)

        launch(0)
        i = 0
        while True:
            if len(out) + 1 < max_tokens:
                launch(i + 1)
            events[i % 2].synchronize()
            tok = int(host[i % 2, 0])
            out.append(tok)
            if on_token:
                on_token(tok)
            if tok in eos_ids:
                return out, "eos"
            if len(out) >= max_tokens:
                return out, "max_tokens"
            i += 1

    def _greedy_staged(self, first: torch.Tensor, pos: int, max_tokens: int, eos_ids: set[int], on_token):
        """Greedy decode of a split step with a host-staged input. Per step: the host stages the
        token's part and queues the second graph, the copy of its choice to pinned memory (with an
        event), the next step's ids and position taken on the device, and the next step's first
        graph, which thus runs while the host waits for the token, fetches its part and stages it.
        A first graph queued for a step that does not come (EOS) only writes a cache slot nobody
        reads."""
        prefetch = getattr(self.model, "prefetch_next", None)
        host = torch.empty(1, 1, dtype=torch.long, pin_memory=True)
        chosen = torch.cuda.Event()
        self.g_ids.copy_(first.view(1, 1))
        self.g_pos.fill_(pos)
        self.graph_start.replay()
        out: list[int] = []
        tok = int(first.item())
        while True:
            out.append(tok)
            ids = torch.tensor([[tok]])
            more = tok not in eos_ids and len(out) < max_tokens
            if prefetch is not None and more:
                prefetch(ids)  # as in the plain loop: the row's read starts before the token is streamed
            if on_token:
                on_token(tok)
            if not more:
                return out, "eos" if tok in eos_ids else "max_tokens"
            self.staged.stage(ids)  # queued behind this step's first graph, ahead of its second
            self.graph.replay()
            host.copy_(self.g_next, non_blocking=True)
            chosen.record()
            if len(out) + 1 < max_tokens:
                self.g_ids.copy_(self.g_next)
                self.g_pos.add_(1)
                self.graph_start.replay()
            chosen.synchronize()
            tok = int(host[0, 0])

    # ---------------------------------------------------------------- generation
    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt ids [1, T] into the cache from position 0; its last logits [1, V]."""
        T = ids.shape[1]
        if self.cpu_step is not None and T <= self.cpu_step.prefill_rows:
            # in C, up to cpu_plan.C_PREFILL_MAX tokens (measured faster there); longer prompts
            # take the module path, whose matmuls over many rows dequantize for a float GEMM
            return self.cpu_step.prefill(ids, 0)
        for i in range(0, T, PREFILL_CHUNK):
            chunk = ids[:, i : i + PREFILL_CHUNK]
            pos = torch.arange(i, i + chunk.shape[1], device=self.device)
            logits = self.model(chunk, pos, self.cache, limit=i + chunk.shape[1])[:, -1]
        return logits

    @torch.inference_mode()
    def generate(
        self,
        prompt: list[int],
        max_tokens: int,
        sampling: Sampling,
        eos_ids: set[int] | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Result:
        if not prompt:
            raise LlmarchError("the prompt is empty (no tokens to condition on)")
        if len(prompt) + max_tokens > self.max_seq:
            raise LlmarchError(
                f"prompt ({len(prompt)} tokens) + --max-tokens {max_tokens} exceed the cache ({self.max_seq})"
            )
        eos_ids = eos_ids or set()
        gen = None
        if sampling.seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
        self.cache.reset()
        dev = self.device
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        t0 = time.perf_counter()
        logits, pending = None, False  # pending: the prompt's bucket is to be captured, after the clock
        graphs = self.prefill_graphs
        if graphs is not None and graphs.fits(len(prompt)):
            logits, pending = graphs.run(prompt)
        if logits is None:
            logits = self._prefill(torch.tensor([prompt], dtype=torch.long, device=dev))
        nxt = sample(logits, sampling, gen)
        sync()
        prefill_s = time.perf_counter() - t0

        out: list[int] = []
        stopped = "max_tokens"
        extra = {}
        if pending:  # a one-off cost, as the decode step's capture below
            extra["prefill_capture_s"] = graphs.capture_bucket(len(prompt))
            if graphs.failed:
                extra["prefill_capture_failed"] = graphs.failed
        if self.use_graph and self.graph is None and max_tokens > 1:
            tc = time.perf_counter()
            self._capture(len(prompt))  # before the clock: capture (and compile) is a one-off cost
            sync()
            extra["capture_s"] = time.perf_counter() - tc
        t1 = time.perf_counter()
        # staged host input: each step needs the token on the host first (greedy: only its second part)
        staged = self.staged if self.graph is not None else None
        if self.graph is not None and not sampling.temperature and (staged is None or self.graph_start is not None):
            greedy = self._greedy_pipelined if staged is None else self._greedy_staged
            out, stopped = greedy(nxt, len(prompt), max_tokens, eos_ids, on_token)
            sync()
            return Result(out, len(prompt), prefill_s, time.perf_counter() - t1, stopped, extra)
        step = self._step_graph if self.use_graph else self._step_eager
        # a model that reads part of a step's input from storage (per-layer embedding rows on disk)
        # starts those reads here, as soon as the sampled id is on the host
        prefetch = getattr(self.model, "prefetch_next", None)
        n = len(prompt)
        while True:
            tok = int(nxt.item())
            out.append(tok)
            host = torch.tensor([[tok]])
            if prefetch is not None and tok not in eos_ids and len(out) < max_tokens:
                prefetch(host)
            if on_token:
                on_token(tok)
            if tok in eos_ids:
                stopped = "eos"
                break
            if len(out) >= max_tokens:
                break
            if staged is not None:
                staged.stage(host)  # copied on this stream, ahead of the replay that reads it
            logits = step(nxt.view(1, 1), n)
            n += 1
            if self.cpu_step is not None and (not sampling.temperature or sampling.temperature <= 0):
                nxt = torch.tensor([[self.cpu_step.next_token()]])  # its argmax, taken in C
            else:
                nxt = sample(logits, sampling, gen)
        sync()
        decode_s = time.perf_counter() - t1
        return Result(out, len(prompt), prefill_s, decode_s, stopped, extra)
