"""`leanlm chat`: history across turns, /reset, /exit, and Ctrl-C stopping a reply without leaving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from leanlm.runtime.sampling import SamplingParams
from leanlm.tools.repl import repl


class FakeLLM:
    path = Path("fake.gguf")

    def __init__(self, interrupt_on: str | None = None) -> None:
        self.seen: list[list[dict]] = []
        self.interrupt_on = interrupt_on

    def constraint(self, json_schema: object) -> None:
        assert json_schema is None

    def chat(self, messages: list[dict], params: SamplingParams, json_schema: object = None) -> Iterator[str]:
        assert json_schema is None
        self.seen.append([dict(m) for m in messages])
        yield "re: "
        if messages[-1]["content"] == self.interrupt_on:
            raise KeyboardInterrupt
        yield messages[-1]["content"]


def feed(lines: list[str]):  # noqa: ANN201
    it = iter(lines)

    def input_fn(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return input_fn


def test_history_reset_and_exit(capsys: pytest.CaptureFixture[str]) -> None:
    llm = FakeLLM()
    repl(llm, SamplingParams(), system="be brief", input_fn=feed(["hi", "again", "/reset", "fresh", "/exit", "never"]))
    assert [len(s) for s in llm.seen] == [2, 4, 2]  # system+user; +assistant+user; reset to system+user
    assert llm.seen[1][2] == {"role": "assistant", "content": "re: hi"}
    assert llm.seen[2][1]["content"] == "fresh"
    out = capsys.readouterr().out
    assert "re: hi\n" in out and "never" not in out


def test_ctrl_c_stops_the_reply_but_not_the_session(capsys: pytest.CaptureFixture[str]) -> None:
    llm = FakeLLM(interrupt_on="long")
    repl(llm, SamplingParams(), input_fn=feed(["long", "next"]))
    assert len(llm.seen) == 2
    assert llm.seen[1][1] == {"role": "assistant", "content": "re: "}  # the partial reply is kept
    assert "[stopped]" in capsys.readouterr().err
