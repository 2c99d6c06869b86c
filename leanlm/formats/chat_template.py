"""Render chat prompts with a model's Jinja chat template, the way Hugging Face does.

The template runs in jinja2's ``ImmutableSandboxedEnvironment`` with the settings and
helpers that templates written for ``transformers`` expect: ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a no-op ``{% generation %}`` block,
``raise_exception``, ``strftime_now``, a ``tojson`` filter that keeps non-ASCII text,
and the variables ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
``tools`` and ``documents``.

Files without ``tokenizer.chat_template`` get a built-in template: for Gemma architectures
(``gemma3`` and its relatives) Gemma's turn format, where the system message is prepended to
the first user turn and ``assistant`` is called ``model``; ChatML otherwise.

BOS: Gemma's official template starts with ``{{ bos_token }}`` while the tokenizer also
adds BOS (``add_bos_token`` is true), which would give two. llama.cpp renders the
template and then drops a leading BOS text when the vocabulary adds BOS on its own; we
do the same in ``Tokenizer.apply_chat_template``, and the built-in Gemma template never
writes BOS. So ``tok.encode(tok.apply_chat_template(msgs), special=True)`` starts with
exactly one BOS for every model.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from leanlm.errors import LeanLMError

CHATML_TEMPLATE = r"""
{%- for m in messages -%}
{{ '<|im_start|>' + m['role'] + '\n' + content_text(m['content']) + '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|im_start|>assistant\n' }}
{%- endif -%}
"""

GEMMA_TEMPLATE = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set first_prefix = content_text(messages[0]['content']) + '\n\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set first_prefix = '' -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif -%}
{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}
{{- first_prefix if loop.first else '' -}}
{{ content_text(m['content']) | trim }}
{{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<start_of_turn>model\n' }}
{%- endif -%}
"""


class _TemplateRaised(Exception):
    """raise_exception() was called by the template."""


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _content_text(content: Any) -> str:
    """A message's content as text: strings as is, the text parts of a list of parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise _TemplateRaised(f"unsupported message content of type {type(content).__name__}")


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, content_text=_content_text)
    return env.from_string(source)


def default_template(architecture: str) -> str:
    """The built-in template for files that carry none."""
    return GEMMA_TEMPLATE if architecture.startswith("gemma") else CHATML_TEMPLATE


def render_chat_template(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "", architecture: str = "",
                         **extra: Any) -> str:
    """Render `messages` with `template` (or the built-in one for `architecture` when None)."""
    source = template if template is not None else default_template(architecture)
    try:
        compiled = _compile(source)
    except jinja2.TemplateSyntaxError as e:
        raise LeanLMError(f"the model's chat template is invalid: {e.message} (line {e.lineno})") from e
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, tools=extra.pop("tools", None),
                               documents=extra.pop("documents", None), **extra)
    except _TemplateRaised as e:
        raise LeanLMError(f"chat template refused the conversation: {e}") from e
    except Exception as e:  # undefined variables, sandbox violations, type errors inside the template
        raise LeanLMError(f"chat template failed: {type(e).__name__}: {e}") from e
