"""Interactive chat: history kept across turns, /reset and /exit, Ctrl-C stops a reply."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leanlm.llm import LLM
    from leanlm.runtime.sampling import SamplingParams

HELP = "commands: /reset (forget the conversation), /exit (leave); Ctrl-C stops a reply"


def repl(llm: LLM, params: SamplingParams, system: str | None = None, input_fn: Any = input,
         json_schema: dict | bool | None = None) -> None:
    """json_schema: every reply is JSON (True: any object; a dict: valid under that JSON Schema)."""
    llm.constraint(json_schema)  # an unenforceable schema fails before the first prompt
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print(f"leanlm chat ({llm.path.name if llm.path else 'model'}). {HELP}", file=sys.stderr)
    while True:
        try:
            line = input_fn("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(start)
            print("(conversation reset)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text}. {HELP}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in llm.chat(messages, params, json_schema=json_schema):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print(" [stopped]", file=sys.stderr, end="")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
