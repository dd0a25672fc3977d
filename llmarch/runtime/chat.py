"""Chat templates rendered with jinja2's sandboxed environment (templates come with downloads:
untrusted code, so no attribute access outside the sandbox's allowance)."""

from __future__ import annotations

from llmarch.errors import LlmarchError


def render_chat(
    template: str | None,
    prompt: str,
    system: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    if not template:
        raise LlmarchError(
            "--chat: this checkpoint carries no chat template (tokenizer_config.json / "
            "tokenizer.chat_template); use a plain --prompt"
        )
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos_token or "", eos_token=eos_token or ""
        )
    except TemplateError as e:
        raise LlmarchError(f"--chat: the chat template failed: {e}") from e
