"""--chat: templates render in jinja2's sandbox the way transformers' apply_chat_template does."""

from __future__ import annotations

import pytest

from llmarch.errors import LlmarchError
from llmarch.runtime.chat import render_chat

GEMMA_LIKE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('no system role') }}{% endif %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_render_matches_transformers_apply_chat_template():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<bos>": 0, "<unk>": 1}, "<unk>")),
        bos_token="<bos>",
        unk_token="<unk>",
    )
    tok.chat_template = GEMMA_LIKE
    msgs = [{"role": "user", "content": " Hi there "}]
    expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert render_chat(GEMMA_LIKE, " Hi there ", bos_token="<bos>") == expected


def test_template_errors_and_sandbox_are_one_clear_error():
    with pytest.raises(LlmarchError, match="no system role"):
        render_chat(GEMMA_LIKE, "hi", system="be brief")
    with pytest.raises(LlmarchError, match="chat template failed"):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", "hi")
    with pytest.raises(LlmarchError, match="no chat template"):
        render_chat(None, "hi")
