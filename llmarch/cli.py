"""`llmarch` command line: each command a thin function over the library.

Known errors become one line on stderr and exit status 2; LLMARCH_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from llmarch.errors import LlmarchError, printable

app = typer.Typer(
    help="Inspect, compare, convert and run open-weight LLM checkpoints.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _classic_help_names() -> None:
    """typer >= 0.2x prints a `<type>` tag beside every option (`--json <bool>`) and a required
    argument as `{source}` in usage lines; show click's usual forms instead: `--prompt TEXT`,
    flags bare, arguments as SOURCE / [SOURCE]. Older typer has none of these hooks (and none of
    the tags), so nothing is changed there."""
    from typer import core

    def option_type(self, ctx):
        return None if self.is_flag or self.count else (self.metavar or self.name.upper())

    def argument_usage(self):
        name = self.display_name_raw
        return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")

    if hasattr(core.TyperOption, "display_type_rich"):
        core.TyperOption.display_type_rich = option_type
    if hasattr(core.TyperArgument, "display_type_rich"):
        core.TyperArgument.display_type_rich = lambda self, ctx: None
    if hasattr(core.TyperArgument, "_usage_display_name"):
        core.TyperArgument._usage_display_name = argument_usage


_classic_help_names()

SourceArg = Annotated[
    str | None,
    typer.Argument(
        metavar="SOURCE",
        help="Folder, .safetensors, .gguf (split too) or Hugging Face repo id; omitted: the embedded Gemma 3 270M.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
ContextOpt = Annotated[
    int | None,
    typer.Option("--context", metavar="TOKENS", help="Context length for KV-cache figures (default: the model's)."),
]
KvDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-dtype", metavar="DTYPE", help="KV cache dtype: f32, f16, bf16, q8_0, fp8 (default: the checkpoint's)."
    ),
]


def _print_version(value: bool) -> None:
    if value:
        from llmarch import __version__

        sys.stdout.write(f"llmarch {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """Inspect, compare, convert and run open-weight LLM checkpoints."""


def emit_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def exclusive(**flags: bool) -> None:
    """Options that each choose the output format: at most one may be given."""
    given = [f"--{name.replace('_', '-')}" for name, on in flags.items() if on]
    if len(given) > 1:
        raise LlmarchError(f"{' and '.join(given)} are exclusive; choose one")


def warn_beyond_context(context: int | None, doc: dict) -> None:
    """--context past the model's trained maximum is answered (its KV figure is what a RoPE-scaled
    extension such as YaRN would need, a fair planning question), with a warning that says so."""
    trained = doc.get("context_length")
    if context and isinstance(trained, int) and context > trained:
        sys.stderr.write(
            f"llmarch: warning: --context {context} is beyond the model's maximum of "
            f"{trained}; its KV figures assume a context extension the model was not trained for\n"
        )


@app.command()
def inspect(
    source: SourceArg = None,
    as_json: JsonOpt = False,
    context: ContextOpt = None,
    kv_dtype: KvDtypeOpt = None,
    diagram: Annotated[
        str | None, typer.Option("--diagram", metavar="FILE", help="Also draw the model to this .svg or .png file.")
    ] = None,
) -> None:
    """Fingerprint a checkpoint from its headers alone.

    Example: llmarch inspect Qwen/Qwen3-0.6B --context 32768 --kv-dtype f16
    """
    from llmarch.api import inspect_source

    doc = inspect_source(source, context, kv_dtype.lower() if kv_dtype else None)
    warn_beyond_context(context, doc)
    if diagram:
        from llmarch.report.diagram import write_diagram

        write_diagram([doc], diagram)
        sys.stderr.write(f"llmarch: wrote the diagram to {diagram}\n")
    if as_json:
        emit_json(doc)
    else:
        from rich.console import Console

        from llmarch.report.table import print_fact_sheet

        print_fact_sheet(doc, Console())


@app.command()
def families(
    as_json: JsonOpt = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table (as in README).")] = False,
) -> None:
    """List the families llmarch knows and which commands each supports (from the recipes).

    Example: llmarch families --markdown
    """
    exclusive(json=as_json, markdown=markdown)
    from llmarch.report import families as fam

    if as_json:
        emit_json(fam.family_rows())
    elif markdown:
        sys.stdout.write(fam.markdown_table())
    else:
        from rich.console import Console

        fam.print_families(Console())


@app.command()
def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="First model (any source inspect accepts).")],
    b: Annotated[str, typer.Argument(metavar="B", help="Second model.")],
    show_all: Annotated[bool, typer.Option("--all", help="Also show the rows that are the same.")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="Compare tensors under canonical (GGUF) names.")] = False,
    as_json: JsonOpt = False,
    as_markdown: Annotated[
        bool, typer.Option("--markdown", help="Print Markdown tables (for a PR or model card).")
    ] = False,
    context: ContextOpt = None,
    kv_dtype: KvDtypeOpt = None,
    diagram: Annotated[
        str | None,
        typer.Option("--diagram", metavar="FILE", help="Draw both stacks side by side to this .svg or .png file."),
    ] = None,
) -> None:
    """Compare two architectures. Exit status: 0 same architecture, 1 different, 2 error.

    Example: llmarch diff Qwen/Qwen3-8B Qwen/Qwen3-30B-A3B --tensors
    """
    exclusive(json=as_json, markdown=as_markdown)
    from llmarch.api import diff_sources
    from llmarch.report.diff import exit_status, markdown, print_diff

    d, da, db = diff_sources(a, b, context, kv_dtype.lower() if kv_dtype else None, tensors)
    for side in (da, db):
        warn_beyond_context(context, side)
    if diagram:
        from llmarch.report.diagram import write_diagram

        write_diagram([da, db], diagram)
        sys.stderr.write(f"llmarch: wrote the diagram to {diagram}\n")
    if as_json:
        emit_json(d)
    elif as_markdown:
        sys.stdout.write(markdown(d, show_all))
    else:
        from rich.console import Console

        print_diff(d, Console(), show_all)
    raise typer.Exit(exit_status(d))


@app.command()
def convert(
    source: Annotated[
        str, typer.Argument(metavar="SOURCE", help="HF folder (config.json + *.safetensors) or a .gguf file.")
    ],
    output: Annotated[
        str | None, typer.Option("-o", "--output", metavar="PATH", help="Output .gguf file or safetensors folder.")
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", metavar="FORMAT", help="gguf | safetensors (default: the other format).")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="GGUF: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 (default: the source's float type); safetensors: f32 f16 bf16 (default f32). Norms stay f32.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the per-tensor plan (name, type, shape, bytes); write nothing.")
    ] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Run source and output on a few prompts: token agreement and logit NMSE.")
    ] = False,
    threads: Annotated[
        int | None, typer.Option("--threads", metavar="N", help="Worker threads (default: all cores).")
    ] = None,
    pre_tokenizer: Annotated[
        str | None,
        typer.Option(
            "--pre-tokenizer",
            metavar="NAME",
            help="llama.cpp pre-tokenizer name when tokenizer.json's regex is not recognised (llama-bpe, qwen2, gpt-2).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Convert between Hugging Face safetensors and GGUF, streamed tensor by tensor.

    Example: llmarch convert ./Qwen3-0.6B --to gguf -o qwen3.gguf --dtype q8_0 --verify
    """
    from llmarch.convert.command import run_convert

    if as_json:
        from llmarch.progress import silence

        silence()
    doc = run_convert(
        source, output, to, dtype.lower() if dtype else None, force, dry_run, verify, threads, pre_tokenizer
    )
    if as_json:
        emit_json(doc)
    else:
        from llmarch.convert.command import print_result

        print_result(doc)
    if (doc.get("verify") or {}).get("verdict") == "fail":
        raise typer.Exit(1)  # converted, but the output does not compute what the source does


@app.command()
def run(
    source: SourceArg = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", "-p", metavar="TEXT", help="Text to continue (or the user message with --chat)."),
    ] = None,
    prompt_ids: Annotated[
        str | None,
        typer.Option(
            "--prompt-ids", metavar="IDS", help="Token ids instead of text, e.g. 1,2,3 (no tokenizer needed)."
        ),
    ] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option("--system", metavar="TEXT", help="System message for --chat.")] = None,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens", "-n", metavar="N", help="Tokens to generate at most (fewer when the context fills first)."
        ),
    ] = 128,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature",
            "-t",
            metavar="T",
            help="Sampling temperature; 0 (the default) always takes the likeliest token.",
        ),
    ] = 0.0,
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", metavar="K", help="Sample from the K likeliest tokens only (0: all). Needs -t > 0."),
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(
            "--top-p",
            metavar="P",
            help="Sample from the likeliest tokens that together reach probability P (0 < P <= 1). Needs -t > 0.",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", metavar="N", help="Random seed: the same seed gives the same sample. Needs -t > 0."),
    ] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Always generate --max-tokens.")] = False,
    device: Annotated[
        str | None, typer.Option("--device", metavar="DEVICE", help="cpu or cuda (default: cuda when present).")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="float32, bfloat16 or float16 (default: the checkpoint's; a GGUF runs from its quantized "
            "blocks, on the CPU and on CUDA, unless --dtype asks for float weights).",
        ),
    ] = None,
    keep_quantized: Annotated[
        bool, typer.Option("--keep-quantized", help="Keep weights 8/4-bit in memory (weight-only matmuls).")
    ] = False,
    quant_bits: Annotated[
        int | None,
        typer.Option("--quant-bits", metavar="BITS", help="8 (default) or 4 with --keep-quantized (4: CPU only)."),
    ] = None,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the decode step (CUDA; first step slower).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print {text, tokens, prompt_tokens, prefill_tok_s, decode_tok_s, stop}.")
    ] = False,
    experts: Annotated[
        str | None,
        typer.Option(
            "--experts", metavar="WHERE", help="MoE: routed experts on gpu, cpu or disk (default: gpu when they fit)."
        ),
    ] = None,
    expert_bits: Annotated[
        int | None,
        typer.Option(
            "--expert-bits",
            metavar="BITS",
            help="MoE: 16, 8 or 4-bit routed experts (group-wise scales). Not given, on cpu/disk: MXFP4 "
            "and GGUF Q8_0/Q4_0/MXFP4/Q4_K/Q5_K/Q6_K experts are read as stored.",
        ),
    ] = None,
    gpu_experts: Annotated[
        int,
        typer.Option("--gpu-experts", metavar="N", help="MoE: keep the N most used experts per layer on the GPU too."),
    ] = 0,
    expert_cache_gib: Annotated[
        float,
        typer.Option(
            "--expert-cache-gib",
            metavar="GIB",
            help="MoE with --experts disk: expert bytes kept mapped before they are dropped (RSS bound).",
        ),
    ] = 2.0,
    expert_dir: Annotated[
        str | None,
        typer.Option(
            "--expert-dir",
            metavar="DIR",
            help="MoE with --experts disk: folder for the quantized expert files (default: a new temporary folder; pick a real disk if /tmp is RAM).",
        ),
    ] = None,
    ple: Annotated[
        str | None,
        typer.Option(
            "--ple",
            metavar="WHERE",
            help="Gemma 3n / Gemma 4: the per-layer embedding table on gpu, cpu or disk (read per token from the "
            "checkpoint; default: disk only when it does not fit in memory).",
        ),
    ] = None,
    ple_cache_mib: Annotated[
        float | None,
        typer.Option(
            "--ple-cache-mib", metavar="MIB", help="With --ple disk: keep recently read rows, up to this many MiB."
        ),
    ] = None,
    ple_dir: Annotated[
        str | None,
        typer.Option(
            "--ple-dir",
            metavar="DIR",
            help="With --ple disk: folder for the row file written once when the stored rows are not read directly "
            "(default: LLMARCH_CACHE/ple).",
        ),
    ] = None,
) -> None:
    """Generate text with a pure-PyTorch runtime built from the checkpoint's ArchSpec.

    Example: llmarch run --prompt "Once upon a time" --max-tokens 40   (the embedded base model)
    """
    from llmarch.runtime.run import RunOptions
    from llmarch.runtime.run import run as run_model

    run_model(
        RunOptions(
            source=source,
            prompt=prompt,
            prompt_ids=prompt_ids,
            chat=chat,
            system=system,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            ignore_eos=ignore_eos,
            device=device,
            dtype=dtype,
            keep_quantized=keep_quantized,
            quant_bits=quant_bits,
            compile=compile,
            as_json=as_json,
            experts=experts,
            expert_bits=expert_bits,
            gpu_experts=gpu_experts,
            expert_cache_gib=expert_cache_gib,
            expert_dir=expert_dir,
            ple=ple,
            ple_cache_mib=ple_cache_mib,
            ple_dir=ple_dir,
        )
    )


@app.command()
def fit(
    source: SourceArg = None,
    memory: Annotated[
        str, typer.Option("--memory", metavar="SIZE", help="Memory of one GPU, e.g. 24GiB, 80G (G = GiB, GB = 10^9).")
    ] = "24GiB",
    gpus: Annotated[int, typer.Option("--gpus", metavar="N", help="GPUs in the machine, each of --memory.")] = 1,
    host_memory: Annotated[
        str | None,
        typer.Option(
            "--host-memory",
            metavar="SIZE",
            help="Host RAM for offloaded parts (default: this machine's available RAM).",
        ),
    ] = None,
    context: Annotated[
        int | None, typer.Option("--context", metavar="TOKENS", help="Context to plan for (default: the model's).")
    ] = None,
    kv_dtype: KvDtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Will it fit, at what context, and with what flags (llmarch run, llama.cpp, vLLM, SGLang)? Headers only.

    Example: llmarch fit Qwen/Qwen3-30B-A3B --memory 24GiB --context 32768
    """
    from llmarch.plan.fit import fit_source

    doc = fit_source(source, memory, gpus, context, kv_dtype, host_memory)
    if as_json:
        emit_json(doc)
    else:
        from rich.console import Console

        from llmarch.report.fit import print_fit

        print_fit(doc, Console())


def _framework_exit(e: Exception) -> int | None:
    """Exit status for the CLI framework's own signals (Exit, Abort, usage errors), else None.

    typer >= 0.2x vendors click (typer._click) with its own exception classes; older typer uses
    click's. Both are handled; a usage error prints click's usual usage + error lines.
    """
    exits, aborts, shown = [], [], []
    try:
        from typer import exceptions as te

        exits.append(te.Exit)
        aborts.append(te.Abort)
        shown.append(te.TyperException)
    except (ImportError, AttributeError):
        pass
    try:
        import click

        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
        shown.append(click.ClickException)
    except ImportError:
        pass
    if isinstance(e, tuple(exits)):
        return int(getattr(e, "exit_code", 0) or 0)
    if isinstance(e, tuple(aborts)):
        sys.stderr.write("llmarch: aborted\n")
        return 130
    if isinstance(e, tuple(shown)) and hasattr(e, "show"):
        e.show()
        return int(getattr(e, "exit_code", 2) or 2)
    return None


def _fast_inspect(argv: list[str]) -> bool:
    """Run `inspect [SOURCE] [--json]`, the common forms, without typer's option processing.

    typer >= 0.2x builds a pydantic validator for every option it parses: ~0.1 s of imports, a
    third of `llmarch inspect model.gguf`. These forms need no parsing, so the command function is
    called directly (its other options keep their Python defaults, as typer would give them). Any
    other form (more options, --help, a SOURCE starting with '-') goes through typer as usual.
    LLMARCH_NO_FAST_PATH=1 turns this off (the tests compare both paths).
    """
    if not argv or argv[0] != "inspect" or os.environ.get("LLMARCH_NO_FAST_PATH"):
        return False
    rest = argv[1:]
    as_json = rest.count("--json") == 1
    if as_json:
        rest.remove("--json")
    if len(rest) > 1 or any(a.startswith("-") for a in rest):
        return False
    inspect(rest[0] if rest else None, as_json=as_json)
    return True


def main() -> None:
    """Entry point: known errors are one line `llmarch: PATH: problem` and exit status 2;
    LLMARCH_DEBUG=1 re-raises them so the traceback shows."""
    debug = bool(os.environ.get("LLMARCH_DEBUG"))
    try:
        if _fast_inspect(sys.argv[1:]):
            return
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except LlmarchError as e:
        if debug:
            raise
        sys.stderr.write(f"llmarch: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("llmarch: interrupted\n")
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`llmarch inspect | head`): not an error
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        sys.exit(0)
    except Exception as e:  # usage errors and anything unexpected: still one line
        code = _framework_exit(e)
        if code is not None:
            sys.exit(code)
        if debug:
            raise
        problem = printable(f"{type(e).__name__}: {e}")  # the message may quote a file's bytes
        sys.stderr.write(f"llmarch: internal error: {problem} (LLMARCH_DEBUG=1 shows the traceback)\n")
        sys.exit(2)
