"""Chat templates rendered the way transformers' apply_chat_template renders them, in a sandbox
whose work is bounded (templates come with downloads: untrusted code, see template_sandbox.py)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension

from llmarch.errors import LlmarchError
from llmarch.runtime.template_sandbox import BoundedSandbox, TemplateLimitError, TemplateLimits


class GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's text with it for
    training masks; rendered, it is its body in a scope of its own, as transformers renders it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # as transformers: no HTML escaping, and its options exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def chat_environment(limits: TemplateLimits | None = None) -> BoundedSandbox:
    """The environment transformers renders chat templates in (its options, tags, globals and
    tojson), as a BoundedSandbox."""
    env = BoundedSandbox(
        limits, trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", GenerationTag]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    env.bound_filters()
    return env


def render_chat(
    template: str | None,
    prompt: str,
    system: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    source: str | Path | None = None,
    limits: TemplateLimits | None = None,
) -> str:
    """SOURCE is the file the template came from, named in every error."""
    if not template:
        raise LlmarchError(
            "--chat: this checkpoint carries no chat template (tokenizer_config.json / "
            "tokenizer.chat_template); use a plain --prompt",
            source,
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        return chat_environment(limits).render_bounded(
            template,
            messages=messages,
            add_generation_prompt=True,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
    except TemplateLimitError as e:
        raise LlmarchError(f"--chat: the chat template was stopped: {e}", source) from None
    except RecursionError:
        raise LlmarchError("--chat: the chat template was stopped: it recursed too deep", source) from None
    except MemoryError:
        raise LlmarchError("--chat: the chat template was stopped: it ran out of memory", source) from None
    except TemplateError as e:
        raise LlmarchError(f"--chat: the chat template failed: {e}", source) from e
    except Exception as e:  # the template is foreign code: whatever it raises is its failure, not ours
        raise LlmarchError(f"--chat: the chat template failed: {type(e).__name__}: {e}", source) from e
