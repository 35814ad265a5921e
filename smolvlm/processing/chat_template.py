"""Render a conversation to a prompt string with the checkpoint's Jinja chat template.

The environment matches transformers' `_cached_compile_jinja_template`
(utils/chat_template_utils.py): `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`
with the loop-controls extension, a `tojson` filter that does not HTML-escape, and the globals
`raise_exception` and `strftime_now`. Templates come from the hub and are untrusted code, hence the
sandbox. The template sees only plain JSON data: media objects (PIL images, arrays, bytes) are
replaced by a placeholder string, as transformers' `_plain_template_data` does.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from smolvlm.processing.errors import ProcessorError

# transformers' SmolVLMProcessor switches to this built-in template whenever a conversation holds a
# video (processing_smolvlm.py, DEFAULT_CHAT_TEMPLATE): it renders {"type": "video"} as <video> and
# accepts string content. Kept verbatim: it decides the exact prompt text.
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ProcessorError(f"the chat template does not compile: {e}") from e


def plain_template_data(value: Any) -> Any:
    """JSON-only copy of what the template sees; anything else becomes an inert placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_template_data(v) for v in value]
    return f"<{type(value).__name__}>"


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, **variables: Any) -> str:
    """One rendered prompt. `variables` are extra template variables (transformers passes the
    tokenizer's special-token map: bos_token, eos_token, ...)."""
    try:
        return compile_template(template).render(
            messages=plain_template_data(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **plain_template_data(variables),
        )
    except jinja2.TemplateError as e:
        raise ProcessorError(f"the chat template failed on this conversation: {e}") from e
