"""`llmarch run`: load, tokenize, generate with streamed output, report speed and memory."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from llmarch.errors import LlmarchError

DEFAULT_MAX_TOKENS = 128


@dataclass(kw_only=True)
class RunOptions:
    source: str | None
    prompt: str | None = None
    prompt_ids: str | None = None
    chat: bool = False
    system: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    device: str | None = None
    dtype: str | None = None
    keep_quantized: bool = False
    quant_bits: int = 8
    compile: bool = False
    as_json: bool = False
    experts: str | None = None  # gpu | cpu | disk
    expert_bits: int | None = None
    gpu_experts: int = 0
    expert_cache_gib: float = 2.0  # --experts disk: mapped expert bytes before they are dropped from RSS
    expert_dir: str | None = None  # --experts disk: where the expert files go


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise LlmarchError(f"--prompt-ids wants comma-separated integers, got {text!r}") from None
    if not ids:
        raise LlmarchError("--prompt-ids is empty")
    return ids


def peak_memory(device) -> str:
    import resource

    import torch

    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"peak RSS {rss / 1024:.0f} MiB"


def run(o: RunOptions) -> dict:
    if o.prompt is None and o.prompt_ids is None:
        raise LlmarchError("give --prompt TEXT or --prompt-ids 1,2,3")
    if o.max_tokens <= 0:
        raise LlmarchError(f"--max-tokens must be positive, got {o.max_tokens}")
    if o.quant_bits not in (4, 8):
        raise LlmarchError(f"--quant-bits must be 8 or 4, got {o.quant_bits}")
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime
    from llmarch.runtime.tokenizer import load_tokenizer

    rt = load_runtime(
        o.source,
        o.device,
        o.dtype,
        o.quant_bits if o.keep_quantized else None,
        o.experts,
        o.expert_bits,
        o.gpu_experts,
        o.expert_cache_gib,
        o.expert_dir,
    )
    tok = None
    if o.prompt_ids is not None:
        ids = parse_ids(o.prompt_ids)
        try:
            tok = load_tokenizer(rt.ckpt)
        except LlmarchError:
            tok = None  # ids in, ids out: a checkpoint without a tokenizer still runs
    else:
        tok = load_tokenizer(rt.ckpt)
        if o.chat:
            from llmarch.runtime.chat import render_chat

            text = render_chat(
                tok.chat_template, o.prompt, o.system, tok.bos_token, tok.eos_token, tok.chat_template_source
            )
            ids = tok.encode(text, special=False)
        else:
            ids = tok.encode(o.prompt)
    bad = [i for i in ids if not 0 <= i < rt.spec.vocab_size]
    if bad:
        raise LlmarchError(f"token id {bad[0]} is outside the vocabulary (0..{rt.spec.vocab_size - 1})")
    context = rt.spec.context_length or 4096
    if len(ids) > context:
        raise LlmarchError(f"the prompt is {len(ids)} tokens, longer than the model's context of {context}")
    max_tokens = min(o.max_tokens, context - len(ids))
    if max_tokens <= 0:
        raise LlmarchError(
            f"the prompt is {len(ids)} tokens and fills the model's context of {context}: no room to generate"
        )

    moe = rt.spec.moe is not None or rt.spec.attention.mla  # routing syncs with the host: no CUDA graph
    gen = Generator(rt, len(ids) + max_tokens, cuda_graph=False if moe else None, compile=o.compile)
    if moe:  # host-offloaded experts: GPU segments between host round trips as CUDA graphs
        from llmarch.runtime.experts.decode import attach_decoder

        attach_decoder(gen)
    eos = set() if o.ignore_eos or tok is None else tok.eos_ids
    err = sys.stderr
    for note in rt.notes:
        err.write(f"llmarch: {note}\n")
    stream = _Streamer(tok, sys.stdout) if not o.as_json else None
    res = gen.generate(
        ids, max_tokens, Sampling(o.temperature, o.top_k, o.top_p, o.seed), eos, stream.push if stream else None
    )
    if stream:
        stream.finish()
    text = tok.decode(res.tokens) if tok is not None else None
    doc = {
        "text": text,
        "tokens": res.tokens,
        "prompt_tokens": len(ids),
        "prefill_tok_s": round(res.prefill_tok_s, 2),
        "decode_tok_s": round(res.decode_tok_s, 2),
    }
    summary = (
        f"prefill {len(ids)} tok {res.prefill_tok_s:.1f} tok/s · decode {len(res.tokens)} tok "
        f"{res.decode_tok_s:.1f} tok/s · {peak_memory(rt.device)} · {rt.device.type} {str(rt.dtype).replace('torch.', '')}"
        + (f" int{o.quant_bits} weights" if o.keep_quantized else "")
        + f" · stop: {res.stopped_by}"
    )
    if moe:
        from llmarch.runtime.experts.report import offloaded, report

        if offloaded(rt.model):
            r = report(rt.model, max(len(res.tokens) - 1, 1), res.decode_s, rt.device)
            doc["offload"] = r
            if "bound_tok_s" in r:
                summary += (
                    f" · {r['expert_format']} experts {r['expert_bytes_per_token'] / 2**20:.1f} MiB/token read from host, "
                    f"bound {r['bound_tok_s']:.1f} tok/s at {r['host_read_gb_s']} GB/s "
                    f"({100 * r['fraction_of_bound']:.0f}%)"
                    + (f" · peak RSS {r['host_rss_peak_mib']} MiB" if rt.device.type == "cuda" else "")
                )
    if o.as_json:
        sys.stdout.write(json.dumps(doc) + "\n")
    err.write(f"llmarch: {summary}\n")
    return doc


class _Streamer:
    """Print text as tokens arrive: decode everything so far and print what is new, holding back
    an incomplete UTF-8 sequence (byte-fallback tokens) until it completes."""

    def __init__(self, tok, out):
        self.tok, self.out, self.ids, self.shown = tok, out, [], ""

    def push(self, tid: int) -> None:
        self.ids.append(tid)
        if self.tok is None:
            self.out.write(f"{tid} ")
            self.out.flush()
            return
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return
        self.out.write(text[len(self.shown) :])
        self.out.flush()
        self.shown = text

    def finish(self) -> None:
        if self.tok is not None:
            text = self.tok.decode(self.ids)
            if text.startswith(self.shown):
                self.out.write(text[len(self.shown) :])
        self.out.write("\n")
        self.out.flush()
