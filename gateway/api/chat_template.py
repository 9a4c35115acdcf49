"""Rendering chat messages into a prompt with the model's jinja2 chat template, the way
transformers' `apply_chat_template` does: a sandboxed environment with trim_blocks and
lstrip_blocks, loop controls, `raise_exception`, a `tojson` that keeps non-ASCII text, and the
variables messages, add_generation_prompt, bos_token and eos_token.

Models without a template (base models such as stories260K) get DEFAULT_CHAT_TEMPLATE, a plain
transcript that a base model can continue:

    <bos>System: You are terse.
    User: Hello
    Assistant:
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from paged.gateway.api.errors import APIError
from paged.gateway.api.protocol import ChatMessage

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str | None, eos_token: str | None) -> None:
        self.source = source if source is not None else DEFAULT_CHAT_TEMPLATE
        self._special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        self._template = self._compile(self.source)  # a broken template fails at startup, not per request

    @staticmethod
    def _compile(source: str) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(source)

    def render_messages(self, messages: list[ChatMessage]) -> str:
        """The prompt of a chat request's messages."""
        return self.render([_template_message(m, i) for i, m in enumerate(messages)])

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text; a template error (including raise_exception) is the client's 400."""
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._special
            )
        except jinja2.TemplateError as e:
            raise APIError(400, f"chat template error: {e}", param="messages") from None


def _template_message(message: ChatMessage, i: int) -> dict[str, Any]:
    """A message as chat templates expect it: content as one string (text parts joined by newlines)."""
    content = message.content
    if isinstance(content, list):
        if any(part.type != "text" or part.text is None for part in content):
            raise APIError(400, "only text content parts are supported", param=f"messages[{i}].content")
        content = "\n".join(part.text for part in content if part.text is not None)
    rendered: dict[str, Any] = {"role": message.role, "content": content or ""}
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
