"""Chat templates are foreign code: rendering is bounded in time, size and depth, every breach is
one line naming the template's file, and templates in the style of Llama 3, Qwen 2.5/3 and Gemma 3
still render exactly as transformers' apply_chat_template renders them (the oracle)."""

from __future__ import annotations

import time

import pytest

from llmarch.errors import LlmarchError
from llmarch.runtime.chat import render_chat
from llmarch.runtime.template_sandbox import TemplateLimits

SOURCE = "/models/x/tokenizer_config.json"


def _stopped(template: str, limits: TemplateLimits | None = None) -> str:
    t0 = time.perf_counter()
    with pytest.raises(LlmarchError) as info:
        render_chat(template, "hi", source=SOURCE, limits=limits)
    assert time.perf_counter() - t0 < 5  # each stops in well under 2 s on an idle 2-core machine; slack for load
    line = str(info.value)
    assert line.startswith(f"{SOURCE}: --chat: the chat template was stopped: ") and "\n" not in line
    return line


def test_nested_loops_stop_at_the_iteration_limit():
    line = _stopped("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    assert "loop iterations and calls" in line


def test_loops_over_strings_and_recursive_loops_are_counted_too():
    s = "{% set s = 'ab' * 50000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"
    assert "loop iterations" in _stopped(s)
    rec = "{% for x in [range(100000)] * 100000 recursive %}{% if x is iterable %}{{ loop(x) }}{% endif %}{% endfor %}"
    assert "loop iterations" in _stopped(rec)


def test_string_and_list_repetition_is_refused_before_it_is_built():
    assert "str * 4000000000 would be 4,000,000,000 long" in _stopped("{{ 'x' * 4000000000 }}")
    assert "list * 100000000 would be" in _stopped("{{ ([1, 2] * 100000000) | length }}")


def test_doubling_by_concatenation_stops_at_the_size_limit():
    for op in ("~", "+"):
        t = "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s " + op + " ns.s %}{% endfor %}"
        assert "would be 8,388,608 long (the limit is 4,194,304)" in _stopped(t)


def test_recursive_macro_stops_at_the_depth_limit():
    assert "nested deeper than 64" in _stopped("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")


def test_range_longer_than_the_sandbox_allows_is_one_line():
    assert "range() of 1,000,000,000 items (the limit is 100,000)" in _stopped("{{ range(10**9) | list }}")
    assert "range() of more than 2**63 items" in _stopped("{% for i in range(10**30) %}{% endfor %}")


def test_exponential_work_without_loops_stops_at_the_deadline():
    fan_out = "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}"
    assert "ran longer than 0.3 s" in _stopped(fan_out, TemplateLimits(seconds=0.3))
    slow_body = "{% set s = 'a' * 4000000 %}{% for i in range(100000) %}{% if 'ab' in s %}{% endif %}{% endfor %}"
    assert "ran longer than 0.3 s" in _stopped(slow_body, TemplateLimits(seconds=0.3))


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x'.center(10**9) }}",
        "{{ 'x' | center(10**9) }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ '{:>{w}}'.format(1, w=999999999) }}",
        "{{ '%999999999d' % 1 }}",
        "{{ '%*d' % (999999999, 1) }}",
        "{{ '%999999999d' | format(1) }}",
        "{{ ('a' * 1000000) | replace('a', 'b' * 1000) }}",
        "{{ ('a' * 1000000).replace('a', 'b' * 1000) }}",
        "{{ ('a\n' * 1000000) | indent('x' * 1000) }}",
        "{{ ('x' * 1000000).join(range(10000) | map('string')) }}",
        "{{ range(100000) | map('string') | join('x' * 1000) }}",
    ],
)
def test_padding_formatting_replace_and_join_are_refused_before_they_are_built(template):
    assert "(the limit is 4,194,304)" in _stopped(template)


def test_output_and_total_work_are_bounded():
    assert "the output would be" in _stopped("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}")
    in_macro = (
        "{% macro m() %}{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}{% endmacro %}{% set x = m() %}"
    )
    assert "characters and items built in all" in _stopped(in_macro)
    assert "characters and items built in all" in _stopped("{{ ([[0] * 4000] * 1000) | sum(start=[]) | length }}")


def test_huge_integers_are_refused():
    assert "an integer would have 1,000,000,000 bits" in _stopped("{{ 2 ** 1000000000 }}")
    squaring = "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}"
    assert "bits (the limit is 65,536)" in _stopped(squaring)


def test_any_exception_a_template_raises_is_its_failure_in_one_line():
    for template in ("{{ 1 / 0 }}", "{{ 10 ** 5000 }}", "{{ 1 + 'a' }}", "{% for %}"):
        with pytest.raises(LlmarchError) as info:
            render_chat(template, "hi", source=SOURCE)
        line = str(info.value)
        assert line.startswith(f"{SOURCE}: --chat: the chat template failed: ") and "\n" not in line


# --------------------------------------------------------------------------- real templates still render
# Abridged from the chat templates these families publish (tokenizer_config.json on the Hub), keeping the
# constructs they use: namespace(), reversed slices, loop.index0/first, is string, trim, tojson,
# strftime_now, raise_exception, whitespace control.

LLAMA3 = (
    "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n"
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}\n{%- endif %}\n'
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n"
    '    {%- set system_message = "" %}\n{%- endif %}\n'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{{- system_message }}\n{{- "<|eot_id|>" }}\n'
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)
QWEN25 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
QWEN3 = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    '    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and '
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n{%- endfor %}\n"
    "{%- for message in messages %}\n    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n    {%- else %}\n        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}\n"
)
GEMMA3 = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n'
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n    {%- else -%}\n'
    "        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n    {%- endif -%}\n'
    "    {{ '<end_of_turn>\\n' }}\n{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\\n'}}\n{%- endif -%}\n"
)
# a macro, a loop control and a recursive loop: the constructs the bounds hook into
MACROS = (
    "{%- macro turn(role, text) -%}<|{{ role }}|>{{ text | trim }}<|end|>{%- endmacro -%}"
    "{%- for m in messages -%}{%- if m.content == '' %}{% continue %}{% endif -%}{{ turn(m.role, m.content) }}"
    "{%- endfor -%}{%- for x in [[1, [2]], 3] recursive -%}{%- if x is iterable %}{{ loop(x) }}{% else %}{{ x }}"
    "{%- endif %}{%- endfor -%}{{ '%-6s|' % 'ok' }}{{ '{:>4}'.format(7) }}{{ messages | tojson }}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif -%}"
)


# transformers' {% generation %} tag (assistant masks for training), as templates that support
# return_assistant_tokens_mask carry it
GENERATION = (
    "{%- for m in messages -%}{%- if m.role == 'assistant' -%}{% generation %}{% set x = 1 %}<a>{{ m.content }}"
    "</a>{% endgeneration %}{{ x }}{%- else -%}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt %}<a>{% endif -%}"
)


@pytest.mark.parametrize("name", ["LLAMA3", "QWEN25", "QWEN3", "GEMMA3", "MACROS", "GENERATION"])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_real_templates_render_as_transformers_renders_them(name, system):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    template = globals()[name]
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<bos>": 0, "<eos>": 1, "<unk>": 2}, "<unk>")),
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    tok.chat_template = template
    prompt = "  What is 2 + 2? <b>&'[bold]x[/] {{ not code }}\n"
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert render_chat(template, prompt, system, "<bos>", "<eos>", source=SOURCE) == expected


def test_run_chat_with_a_hostile_template_is_one_line_naming_its_file(tiny, tmp_path, capsys, monkeypatch):
    """Through the CLI's entry point (in process: the tiny model is already loaded by then):
    exit 2 and one line naming the file the template came from."""
    pytest.importorskip("torch")
    import json
    import shutil
    import sys

    from llmarch.cli import main
    from tests.test_convert import add_tokenizer

    folder = shutil.copytree(tiny("llama"), tmp_path / "m")
    add_tokenizer(folder, json.loads((folder / "config.json").read_text())["vocab_size"])
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    monkeypatch.delenv("LLMARCH_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["llmarch", "run", str(folder), "--chat", "--prompt", "hi", "--device", "cpu"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == (
        f"llmarch: {folder / 'tokenizer_config.json'}: --chat: the chat template was stopped: "
        "more than 262,144 loop iterations and calls"
    )
    assert not any("Traceback" in line or "internal error" in line for line in lines)


def test_generation_tag_renders_assistant_turns_as_transformers_does():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    from llmarch.runtime.chat import chat_environment

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")), unk_token="<unk>"
    )
    tok.chat_template = GENERATION
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<a>yo</a>" in expected
    assert chat_environment().render_bounded(GENERATION, messages=msgs, add_generation_prompt=True) == expected
