"""Render a conversation to a prompt string with the checkpoint's Jinja chat template.

The environment matches transformers' `_cached_compile_jinja_template`
(utils/chat_template_utils.py): `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`
with the loop-controls extension, a `tojson` filter that does not HTML-escape, and the globals
`raise_exception` and `strftime_now`. Templates come from the hub and are untrusted code, hence the
sandbox. The template sees only plain JSON data: media objects (PIL images, arrays, bytes) are
replaced by a placeholder string, as transformers' `_plain_template_data` does.

The sandbox stops attribute tricks, not runaway work: Jinja caps `range` but not loops nested in
loops, nor `'x' * 10**10`. So rendering here also has limits (transformers has none):
- time: `TEMPLATE_TIME_LIMIT_S` of Python execution, enforced by a trace function on the rendering
  thread (the template compiles to Python; every line it runs checks the deadline). The trace
  function replaces a debugger's or coverage's for the few milliseconds of a render;
- size: `TEMPLATE_MAX_CHARS` of output, and no `*`, `**`, `+` or string method in the template may
  build a string, list or number larger than that (checked before the operation runs).
"""

from __future__ import annotations

import json
import re
import sys
import time
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


TEMPLATE_TIME_LIMIT_S = 2.0  # a real chat template renders in about a millisecond
TEMPLATE_MAX_CHARS = 4_000_000  # output, and any string or list built on the way (far beyond any context)


class _TemplateLimit(BaseException):
    """Raised inside the template's code; a BaseException so no `except Exception` in Jinja's runtime
    swallows it. Turned into a ProcessorError by `render`."""


def _size(value: Any) -> int:
    if isinstance(value, (str, bytes, list, tuple, dict)):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 8
    return 0


_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\d+)?(?:\.(\d+))?")


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        limit = TEMPLATE_MAX_CHARS
        if operator == "%" and isinstance(left, str):  # printf-style: a width or precision can be huge
            for width, precision in _FORMAT_WIDTH.findall(left):
                if len(width) > 7 or len(precision) > 7 or int(width or 0) + int(precision or 0) > limit:
                    raise _TemplateLimit("a %-format with a width or precision over the output limit")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and abs(left).bit_length() * right > 8 * limit:
                raise _TemplateLimit(f"a power of {abs(left).bit_length() * right} bits is too large")
        elif operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > 8 * limit:
                    raise _TemplateLimit("a product too large")
            elif isinstance(left, int) or isinstance(right, int):  # sequence * count
                count, seq = (left, right) if isinstance(left, int) else (right, left)
                if count > 0 and _size(seq) * count > limit:
                    raise _TemplateLimit(f"a repetition of {_size(seq) * count} items")
        elif operator == "+" and _size(left) + _size(right) > limit:
            raise _TemplateLimit(f"a sum of {_size(left) + _size(right)} items")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, list)) and any(
            isinstance(a, int) and a > TEMPLATE_MAX_CHARS for a in (*args, *kwargs.values())
        ):
            raise _TemplateLimit(f"{getattr(__obj, '__name__', 'a method')}() with a count over {TEMPLATE_MAX_CHARS}")
        return super().call(__context, __obj, *args, **kwargs)


def _limited(function):
    """A filter that refuses integer arguments larger than the output limit (a width, a count)."""

    def limited(*args, **kwargs):
        if any(type(a) is int and a > TEMPLATE_MAX_CHARS for a in (*args[1:], *kwargs.values())):
            raise _TemplateLimit(f"the {getattr(function, '__name__', 'filter')} filter with a count over {TEMPLATE_MAX_CHARS}")
        return function(*args, **kwargs)

    for attribute in ("jinja_pass_arg",):  # keep Jinja's pass_context / pass_environment markers
        if hasattr(function, attribute):
            setattr(limited, attribute, getattr(function, attribute))
    return limited


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    # optimized=False: no constant folding, which would evaluate `'x' | center(10**9)` while compiling,
    # outside the limits
    env = _LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], optimized=False)
    env.filters = {name: _limited(f) for name, f in env.filters.items()}  # center, indent, wordwrap... take counts
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
        context = dict(
            messages=plain_template_data(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **plain_template_data(variables),
        )
    except RecursionError:
        raise ProcessorError("the conversation is nested too deeply (or refers to itself) to render") from None
    try:
        # compiling is limited too: Jinja evaluates constant output expressions while it compiles
        compiled = _within_limits(lambda: compile_template(template))
        return _within_limits(lambda: _generate(compiled, context))
    except _TemplateLimit as e:
        raise ProcessorError(f"the chat template was stopped: {e}") from None
    except jinja2.TemplateError as e:
        raise ProcessorError(f"the chat template failed on this conversation: {e}") from e
    except RecursionError:
        raise ProcessorError("the chat template was stopped: it recursed too deeply") from None
    except (MemoryError, OverflowError, ValueError, TypeError) as e:  # ints too large to print, and the like
        raise ProcessorError(f"the chat template failed: {type(e).__name__}: {str(e)[:200]}") from None


def _within_limits(work):
    """work() within TEMPLATE_TIME_LIMIT_S of Python execution, no function returning a value over
    TEMPLATE_MAX_CHARS (a trace function on this thread; the previous one is put back after)."""
    deadline = time.monotonic() + TEMPLATE_TIME_LIMIT_S

    def check(frame, event, arg):  # every call, line and return of this thread meanwhile
        if time.monotonic() > deadline:
            raise _TemplateLimit(f"it ran for more than {TEMPLATE_TIME_LIMIT_S:g} s")
        if event == "return" and _size(arg) > TEMPLATE_MAX_CHARS:
            raise _TemplateLimit(f"it built a value of {_size(arg)} items")
        return check

    previous = sys.gettrace()
    sys.settrace(check)
    try:
        return work()
    finally:
        sys.settrace(previous)


def _generate(compiled: jinja2.Template, context: dict[str, Any]) -> str:
    """`compiled.render(**context)`, its output capped at TEMPLATE_MAX_CHARS."""
    pieces, size = [], 0
    for piece in compiled.generate(**context):
        size += len(piece)
        if size > TEMPLATE_MAX_CHARS:
            raise _TemplateLimit(f"its output passed {TEMPLATE_MAX_CHARS} characters")
        pieces.append(piece)
    return "".join(pieces)
