"""response_format through the server with the real openai client: json_schema via `parse` with a pydantic
model, json_object, batched constrained rows; greedy answers equal the Python API's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

from helpers.serving import running_server  # noqa: E402

import leanlm  # noqa: E402


class City(pydantic.BaseModel):
    name: str
    country: str
    population: int
    landmarks: list[str] = pydantic.Field(max_length=3)  # maxItems: a 135M model repeats itself otherwise


@pytest.fixture(scope="module")
def llm(smol_path: Path) -> leanlm.LLM:
    return leanlm.load(smol_path, compile="off", progress=False)


@pytest.fixture(scope="module")
def client(llm: leanlm.LLM) -> Iterator[openai.OpenAI]:
    with running_server(llm) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


ASK = [{"role": "user", "content": "Describe Paris as JSON with name, country, population and landmarks."}]


def test_parse_with_a_pydantic_model(client: openai.OpenAI, llm: leanlm.LLM) -> None:
    r = client.chat.completions.parse(model="smol", messages=ASK, response_format=City, temperature=0,
                                      max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    city = choice.message.parsed
    assert isinstance(city, City) and city.name and len(city.landmarks) <= 3
    # the same schema through the Python API gives the same greedy text
    schema = openai.lib._pydantic.to_strict_json_schema(City)
    local = "".join(llm.chat(ASK, temperature=0, max_tokens=200, json_schema=schema))
    assert choice.message.content == local
    assert City.model_validate_json(local) == city


def test_json_object_streamed_and_batched(client: openai.OpenAI) -> None:
    """n = 3 sampled answers decode as three constrained rows of one batch; each parses as an object."""
    msgs = [{"role": "user", "content": "Give a JSON object with your favourite colour."}]
    stream = client.chat.completions.create(model="smol", messages=msgs, response_format={"type": "json_object"},
                                            n=3, seed=7, temperature=0.6, max_tokens=200, stream=True)
    texts, reasons = ["", "", ""], [None, None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    for text, reason in zip(texts, reasons):
        if reason == "stop":  # "length": the budget ran out mid-object, as OpenAI reports it too
            assert isinstance(json.loads(text), dict)
        else:
            assert reason == "length" and text.startswith("{")
    assert "stop" in reasons


def test_completions_take_response_format_too(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    r = client.completions.create(model="smol", prompt="Is the sky blue? Answer in JSON:", max_tokens=30,
                                  temperature=0, extra_body={"response_format": {
                                      "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    assert json.loads(r.choices[0].text)["answer"] in ("yes", "no")
    assert r.choices[0].finish_reason == "stop"
