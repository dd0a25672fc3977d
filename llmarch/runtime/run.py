"""`llmarch run`: load, tokenize, generate with streamed output, report speed and memory."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

from llmarch import IMPORTED_AT_BOOTTIME
from llmarch.errors import LlmarchError, printable

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
    quant_bits: int | None = None  # 8 when --keep-quantized gives none
    compile: bool = False
    as_json: bool = False
    experts: str | None = None  # gpu | cpu | disk
    expert_bits: int | None = None
    gpu_experts: int = 0
    expert_cache_gib: float = 2.0  # --experts disk: mapped expert bytes before they are dropped from RSS
    expert_dir: str | None = None  # --experts disk: where the expert files go
    ple: str | None = None  # per-layer embedding table: gpu | cpu | disk (default: where it fits)
    ple_cache_mib: float | None = None  # --ple disk: hot-row cache budget
    ple_dir: str | None = None  # --ple disk: folder for a row file when the stored rows are not read directly


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise LlmarchError(f"--prompt-ids wants comma-separated integers, got {text!r}") from None
    if not ids:
        raise LlmarchError("--prompt-ids is empty")
    return ids


def peak_memory(device) -> str:
    if device.type == "cuda":
        import torch

        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return f"peak RSS {_peak_rss_mib():.0f} MiB"


def check_options(o: RunOptions) -> None:
    """Every option that can be judged alone, before any file is opened."""
    if o.prompt is None and o.prompt_ids is None:
        raise LlmarchError("give --prompt TEXT or --prompt-ids 1,2,3")
    if o.prompt is not None and o.prompt_ids is not None:
        raise LlmarchError("--prompt and --prompt-ids are exclusive; give one")
    if o.chat and o.prompt_ids is not None:
        raise LlmarchError("--chat wraps a text --prompt in the chat template; it cannot take --prompt-ids")
    if o.system is not None and not o.chat:
        raise LlmarchError("--system is the system message of --chat; add --chat or drop --system")
    if o.max_tokens <= 0:
        raise LlmarchError(f"--max-tokens must be positive, got {o.max_tokens}")
    if not math.isfinite(o.temperature) or o.temperature < 0:
        raise LlmarchError(f"--temperature must be 0 (greedy) or positive, got {o.temperature}")
    if o.top_k is not None and o.top_k < 0:
        raise LlmarchError(f"--top-k must be 0 (off) or positive, got {o.top_k}")
    if o.top_p is not None and not 0 < o.top_p <= 1:
        raise LlmarchError(f"--top-p must be in (0, 1], got {o.top_p}")
    sampling_only = [n for n, v in (("--top-k", o.top_k), ("--top-p", o.top_p), ("--seed", o.seed)) if v is not None]
    if sampling_only and o.temperature == 0:
        raise LlmarchError(
            f"{' and '.join(sampling_only)} only {'applies' if len(sampling_only) == 1 else 'apply'} when "
            "sampling; add --temperature > 0 (0 is greedy)"
        )
    if o.quant_bits is not None and not o.keep_quantized:
        raise LlmarchError("--quant-bits applies with --keep-quantized; add it or drop --quant-bits")
    if o.quant_bits not in (None, 4, 8):
        raise LlmarchError(f"--quant-bits must be 8 or 4, got {o.quant_bits}")
    if o.prompt_ids is not None:
        parse_ids(o.prompt_ids)


def stored_blocks_asked(o: RunOptions, ckpt) -> bool:
    """Whether a GGUF's matrices run from its stored blocks (on the CPU, and on CUDA where triton
    runs): by default, and with --keep-quantized without --quant-bits; --dtype asks for float weights."""
    if o.keep_quantized:
        return o.quant_bits is None
    return ckpt.format == "gguf" and o.dtype is None


def prompt_tokens(o: RunOptions, ckpt):
    """(tokenizer or None, prompt ids): from --prompt-ids, or --prompt through the tokenizer and,
    with --chat, the chat template (all from the header and tokenizer files: no weights read)."""
    from llmarch.runtime.tokenizer import load_tokenizer

    if o.prompt_ids is not None:
        try:
            tok = load_tokenizer(ckpt)
        except LlmarchError:
            tok = None  # ids in, ids out: a checkpoint without a tokenizer still runs
        return tok, parse_ids(o.prompt_ids)
    tok = load_tokenizer(ckpt)
    if o.chat:
        from llmarch.runtime.chat import render_chat

        text = render_chat(
            tok.chat_template, o.prompt, o.system, tok.bos_token, tok.eos_token, tok.chat_template_source
        )
        return tok, tok.encode(text, special=False)
    return tok, tok.encode(o.prompt)


def header_line(source: str | None, ckpt, spec, tok) -> str:
    """What runs, printed before the output. A checkpoint without a chat template
    is a base model: it continues text, and a question gets continued rather than answered."""
    name = "the embedded Gemma 3 270M" if not source else ckpt.path.name
    kind = (
        "base model (no chat template): it continues your text rather than answering it"
        if tok is not None and not tok.chat_template
        else "chat template available (--chat)"
        if tok is not None
        else "no tokenizer: token ids in and out"
    )
    return printable(f"{name} ({spec.family}, {spec.layers} layers), {kind}")  # names from the file


def native_options(o: RunOptions) -> bool:
    """Whether the options leave nothing for torch to do: greedy decoding on the CPU of a GGUF's
    stored blocks, nothing else asked (a saved decode plan then runs without torch: native_run.py).
    `--device auto` counts only where no GPU device node exists (torch would pick it)."""
    from llmarch.runtime.native_run import gpu_possible

    if os.environ.get("LLMARCH_NO_NATIVE") or os.environ.get("LLMARCH_NO_CKERNEL"):
        return False
    if o.device not in (None, "auto", "cpu") or (o.device != "cpu" and gpu_possible()):
        return False
    asked = (o.dtype, o.quant_bits, o.experts, o.expert_bits, o.expert_dir, o.ple, o.ple_cache_mib, o.ple_dir)
    return o.temperature == 0 and not o.keep_quantized and not o.compile and not o.gpu_experts and asked == (None,) * 8


def _torch_device(o: RunOptions):
    """The torch device and thread choice, with the options that depend on it checked."""
    from llmarch.runtime.load import dtype_named, pick_cpu_threads, pick_device

    device = pick_device(o.device)
    threads_note = pick_cpu_threads() if device.type == "cpu" else None  # before any torch work
    if o.dtype is not None:
        dtype_named(o.dtype)
    if o.compile and device.type != "cuda":
        raise LlmarchError("--compile compiles the CUDA decode step; it does nothing on the CPU")
    return device, threads_note


def _room(o: RunOptions, spec, ids: list[int]) -> tuple[int, int]:
    """(tokens to generate, free context after the prompt), or the reason there are none."""
    bad = [i for i in ids if not 0 <= i < spec.vocab_size]
    if bad:
        raise LlmarchError(f"token id {bad[0]} is outside the vocabulary (0..{spec.vocab_size - 1})")
    context = spec.context_length or 4096
    if len(ids) > context:
        raise LlmarchError(f"the prompt is {len(ids)} tokens, longer than the model's context of {context}")
    room = context - len(ids)
    max_tokens = min(o.max_tokens, room)
    if max_tokens <= 0:
        raise LlmarchError(
            f"the prompt is {len(ids)} tokens and fills the model's context of {context}: no room to generate"
        )
    return max_tokens, room


def run(o: RunOptions) -> dict:
    check_options(o)
    from llmarch.api import load_checkpoint_spec
    from llmarch.runtime.run_checks import check_moe_options, check_supported, kernel_threads

    native = native_options(o)
    device = threads_note = None
    if not native:
        device, threads_note = _torch_device(o)
    ckpt, spec = load_checkpoint_spec(o.source)  # headers only: every check below comes before the weights
    check_supported(spec, ckpt.path, ckpt.format == "gguf")
    check_moe_options(spec, o.experts, o.expert_bits, o.gpu_experts, o.expert_dir)
    if native and ckpt.format == "gguf":  # the C decoder runs it, or saves its plan after the torch path
        from llmarch.runtime.cpu_plan import start_building

        start_building()
    if not native:  # the --ple options (none given on the native path)
        from llmarch.runtime.ple import check_options as check_ple_options

        check_ple_options(spec, o.ple, o.ple_cache_mib, o.ple_dir)
    tok, ids = prompt_tokens(o, ckpt)
    max_tokens, room = _room(o, spec, ids)
    if o.as_json:
        from llmarch.progress import silence

        silence()
    eos = set() if o.ignore_eos or tok is None else tok.eos_ids
    from llmarch.runtime.cpu_plan import C_PREFILL_MAX

    if native and ckpt.format == "gguf" and len(ids) <= C_PREFILL_MAX:  # longer: the torch path's prefill
        from llmarch.runtime.native_run import open_decoder

        threads = kernel_threads()
        opened = open_decoder(ckpt, spec, len(ids) + max_tokens, threads)
        opened = (*opened, None) if opened is not None else _first_plan(ckpt, spec, len(ids) + max_tokens, threads)
        if opened is not None:
            decoder, notes, encoded = opened
            if not os.environ.get("OMP_NUM_THREADS"):
                notes = [*notes, f"{threads} CPU thread{'s' if threads > 1 else ''} (OMP_NUM_THREADS=N sets it)"]
            _announce(o, ckpt, spec, tok, notes)
            res = _generate(o, tok, lambda push: decoder.generate(ids, max_tokens, eos, push))
            doc = _report(o, tok, ids, room, res, f"peak RSS {_peak_rss_mib():.0f} MiB · cpu float32")
            if encoded is not None:  # built by this run: saved after its output, for the runs after it
                from llmarch.runtime import plan_file

                try:
                    plan_file.store(ckpt, encoded)
                except OSError:
                    pass  # a cache that cannot be written only costs later runs the build
            return doc
    if device is None:
        device, threads_note = _torch_device(o)
    quant_bits = (o.quant_bits or 8) if o.keep_quantized else None
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime
    from llmarch.runtime.ple import find_store
    from llmarch.runtime.ple import summary as ple_summary

    rt = load_runtime(
        o.source,
        o.device,
        o.dtype,
        quant_bits,
        o.experts,
        o.expert_bits,
        o.gpu_experts,
        o.expert_cache_gib,
        o.expert_dir,
        opened=(ckpt, spec),
        ple=o.ple,
        ple_cache_mib=o.ple_cache_mib,
        ple_dir=o.ple_dir,
        # a GGUF runs on its own blocks (on the CPU) unless --quant-bits asks for llmarch's blocks or
        # --dtype for float weights; other types are requantized with --keep-quantized, else float
        stored_blocks=stored_blocks_asked(o, ckpt),
    )

    moe = rt.spec.moe is not None or rt.spec.attention.mla
    # resident experts route without a host sync, so their decode step is one CUDA graph; experts
    # elsewhere (or a mixer not proven capturable: chunked or compressed attention) leave the GPU mid-step
    graph: bool | None = None
    if moe:
        from llmarch.runtime.experts.decode import attach_decoder, whole_step_capturable

        graph = None if whole_step_capturable(rt.model) else False
    ple = find_store(rt.model)
    # per-layer rows gathered on the host reach a CUDA graph through the store's static buffer
    gen = Generator(rt, len(ids) + max_tokens, cuda_graph=graph, compile=o.compile)
    if graph is False:  # host-offloaded experts: GPU segments between host round trips as CUDA graphs
        attach_decoder(gen)
    load_notes = list(rt.notes)
    if threads_note:
        rt.notes.append(threads_note)
    _announce(o, ckpt, spec, tok, rt.notes)
    sampling = Sampling(o.temperature, o.top_k, o.top_p, o.seed)
    res = _generate(o, tok, lambda push: gen.generate(ids, max_tokens, sampling, eos, push))
    where = f"{peak_memory(rt.device)} · {rt.device.type} {str(rt.dtype).replace('torch.', '')}" + (
        f" int{quant_bits} weights" if quant_bits else ""
    )
    extra: dict = {}
    if moe:
        from llmarch.runtime.experts.report import offloaded, report

        if offloaded(rt.model):
            r = report(rt.model, max(len(res.tokens) - 1, 1), res.decode_s, rt.device)
            extra["offload"] = r
            if "bound_tok_s" in r:
                extra[" · offload"] = (
                    f"{r['expert_format']} experts {r['expert_bytes_per_token'] / 2**20:.1f} MiB/token read from host, "
                    f"bound {r['bound_tok_s']:.1f} tok/s at {r['host_read_gb_s']} GB/s "
                    f"({100 * r['fraction_of_bound']:.0f}%)"
                    + (f" · peak RSS {r['host_rss_peak_mib']} MiB" if rt.device.type == "cuda" else "")
                )
    if ple is not None:
        extra["ple"] = ple.report()
        extra["ple"]["cuda_graph"] = gen.graph is not None  # decode steps replayed from one captured graph
        extra[" · ple"] = ple_summary(extra["ple"])
    doc = _report(o, tok, ids, room, res, where, extra)
    if gen.cpu_step is not None and ckpt.format == "gguf":  # after the run's own output: no wait before it
        _save_plan(gen.cpu_step, rt, ckpt, load_notes)
    return doc


def _first_plan(ckpt, spec, max_seq: int, threads: int):
    """No plan saved for this GGUF yet: build it without torch (plan_build.py) and open the native
    decoder on it, so that a first run goes without torch too -> (decoder, notes, the plan's bytes,
    saved after the run's output). None where the builder is not sure the C step runs the model as
    the torch path would: the torch path then runs and saves the plan."""
    from llmarch.runtime import plan_build, plan_file
    from llmarch.runtime.cpu_plan import lib
    from llmarch.runtime.native_run import open_decoder

    positions = min(plan_file.MAX_POSITIONS, spec.context_length or plan_file.MAX_POSITIONS)  # its RoPE rows
    if lib() is None or max_seq > positions or plan_file.plan_path(ckpt).exists():
        return None
    try:
        encoded = plan_file.encode(*plan_build.build(ckpt, spec))
    except plan_build.NotBuilt:
        return None
    opened = open_decoder(ckpt, spec, max_seq, threads, encoded)
    return (*opened, encoded) if opened is not None else None


def _save_plan(step, rt, ckpt, notes: list[str]) -> None:
    """Save the C decode plan for later runs of this file to start without torch (plan_file.py); a
    cache that cannot be written only costs them that."""
    from llmarch.runtime import plan_file
    from llmarch.runtime.native_run import open_decoder

    if os.environ.get("LLMARCH_NO_NATIVE") or open_decoder(ckpt, rt.spec, 1, 1) is not None:
        return  # none wanted, or a good one saved already (one the native run refuses is replaced)
    try:
        plan_file.save(step, rt.model, ckpt, rt.spec, notes)
    except OSError:
        pass


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _announce(o: RunOptions, ckpt, spec, tok, notes: list[str]) -> None:
    err = sys.stderr
    err.write(f"llmarch: {header_line(o.source, ckpt, spec, tok)}\n")  # after the load: a failed one stays one line
    for note in notes:
        err.write(f"llmarch: {note}\n")


def _generate(o: RunOptions, tok, generate):
    """generate(on_token) with the tokens streamed to stdout as they come (not with --json)."""
    stream = _Streamer(tok, sys.stdout) if not o.as_json else None
    res = generate(stream.push if stream else None)
    if stream:
        stream.finish()
        if stream.first_s is not None:
            res.extra["first_token_after_start_s"] = stream.first_s
    return res


# Python reaches llmarch's first import within a fraction of a second of its own start (longer
# only on a cold disk); a process started much earlier than that was forked for something else
_MAX_STARTUP_S = 3.0


def _process_age_s() -> float | None:
    """Seconds since this program started, or None: from /proc/self/stat's start time (Linux),
    which counts Python's own start-up. That time is the fork, not the exec: a shell running
    `a && b && llmarch ...` can exec llmarch in the process it forked before `a`, so where the
    fork lies far before llmarch's first import, that import is the start."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted from the state (3)
        forked = start / os.sysconf("SC_CLK_TCK")
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    imported = IMPORTED_AT_BOOTTIME
    if imported is not None and imported - forked > _MAX_STARTUP_S:
        return now - imported
    return now - forked


def _report(o: RunOptions, tok, ids: list[int], room: int, res, where: str, extra: dict | None = None) -> dict:
    """The run's JSON document (printed with --json) and its closing line on stderr. `extra`: more
    document entries, and summary parts under keys starting with " · "."""
    text = tok.decode(res.tokens) if tok is not None else None
    # asked for more than the context holds, and every free slot was used: the context stopped it
    stop = "context full" if res.stopped_by == "max_tokens" and o.max_tokens > room else res.stopped_by
    doc = {
        "text": text,
        "tokens": res.tokens,
        "prompt_tokens": len(ids),
        "prefill_tok_s": round(res.prefill_tok_s, 2),
        "decode_tok_s": round(res.decode_tok_s, 2),
        "stop": stop,
    }
    extra = extra or {}
    doc.update({k: v for k, v in extra.items() if not k.startswith(" · ")})
    first = res.extra.get("first_token_after_start_s")  # text streamed: when its first token was printed
    summary = (
        f"prefill {len(ids)} tok {res.prefill_tok_s:.1f} tok/s · decode {len(res.tokens)} tok "
        f"{res.decode_tok_s:.1f} tok/s · "
        + (f"first token {first:.2f} s after start · " if first is not None else "")
        + f"{where} · stop: {stop}"
        + "".join(f" · {v}" for k, v in extra.items() if k.startswith(" · "))
    )
    if o.as_json:
        sys.stdout.write(json.dumps(doc) + "\n")
    sys.stderr.write(f"llmarch: {summary}\n")
    return doc


class _Streamer:
    """Print text as tokens arrive: decode everything so far and print what is new, holding back
    an incomplete UTF-8 sequence (byte-fallback tokens) until it completes."""

    def __init__(self, tok, out):
        self.tok, self.out, self.ids, self.shown = tok, out, [], ""
        self.first_s: float | None = None  # the process's age when the first token came

    def push(self, tid: int) -> None:
        if not self.ids:
            self.first_s = _process_age_s()
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
