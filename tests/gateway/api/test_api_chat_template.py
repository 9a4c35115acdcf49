"""Chat templates rendered as transformers renders them."""

from __future__ import annotations

import pytest

from paged.gateway.api.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from paged.gateway.api.errors import APIError

# A Llama-2-style template: exercises trim_blocks/lstrip_blocks, loop variables, raise_exception.
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set messages = messages[1:] %}
{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + (('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n') if loop.first and system is defined else '') + message['content'] + ' [/INST]' }}
    {% else %}
        {{ ' ' + message['content'] + ' ' + eos_token }}
    {% endif %}
{% endfor %}"""


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


@pytest.mark.parametrize("source", [LLAMA2, DEFAULT_CHAT_TEMPLATE])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_same_as_transformers(source: str, add_generation_prompt: bool) -> None:
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    expected = chat_template_utils.render_jinja_template(
        [MESSAGES], chat_template=source, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>"
    )[0][0]
    assert ChatTemplate(source, "<s>", "</s>").render(MESSAGES, add_generation_prompt) == expected


def test_raise_exception_is_a_400() -> None:
    template = ChatTemplate(LLAMA2, "<s>", "</s>")
    with pytest.raises(APIError) as error:
        template.render([{"role": "assistant", "content": "first"}])
    assert error.value.status == 400 and "alternate" in error.value.message


def test_generation_prompt_and_tojson() -> None:
    source = "{% for m in messages %}<|{{ m.role }}|>{{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    template = ChatTemplate(source, None, None)
    messages = [{"role": "user", "content": "café"}]
    assert template.render(messages) == '<|user|>{"role": "user", "content": "café"}\n<|assistant|>'
    assert template.render(messages, add_generation_prompt=False) == '<|user|>{"role": "user", "content": "café"}\n'


def test_sandboxed() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__ }}", None, None)
    with pytest.raises(APIError):
        template.render([])


def test_default_template() -> None:
    template = ChatTemplate(None, "<s>", "</s>")
    assert template.source == DEFAULT_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]
    assert template.render(messages) == "<s>System: You are terse.\nUser: Hello\nAssistant:"
