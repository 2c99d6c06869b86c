"""Structured output: the schema compiler, the byte-level parser and the token masks.

The guarantee users rely on: whatever the sampler picks among allowed tokens, a finished output parses
and validates against the schema; and every document in the grammar's form is reachable.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanlm.formats.gguf_file import GGUFFile
from leanlm.formats.tokenizer import Tokenizer
from leanlm.runtime.structured import Grammars, SchemaError
from leanlm.runtime.structured import parser as P
from leanlm.runtime.structured.schema import compile_schema, json_object

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "kind": {"enum": ["cat", "dog", 3, None, True]},
        "home": {"$ref": "#/$defs/Place"},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
    "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}
TREE = {"$defs": {"T": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
    "type": "array", "items": {"$ref": "#/$defs/T"}, "maxItems": 2}}, "required": ["v", "kids"]}},
    "$ref": "#/$defs/T"}


def accepts(node: object, text: str) -> bool:
    state = P.advance(P.initial(node), text.encode())
    return bool(state) and P.can_end(state)


@pytest.mark.parametrize(("schema", "word"), [
    ({"type": "string", "pattern": "^a$"}, "pattern"),
    ({"type": "string", "format": "date-time"}, "format"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "integer", "minimum": 5}, "minimum"),
    ({"type": "integer", "maximum": 5}, "maximum"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
    ({"$ref": "https://example.com/s.json"}, "$ref"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf"),
    ({"type": "object", "required": ["a"]}, "required"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
    ({"type": ["string", "null"], "multipleOf": 2}, "multipleOf"),
    ({"type": "text"}, "text"),
])
def test_schemas_we_cannot_enforce_are_refused_by_name(schema: dict, word: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(word)):
        compile_schema(schema)


@pytest.mark.parametrize(("text", "ok"), [
    ('{"name":"Al","age":3,"tags":[]}', True),
    ('{ "name": "Al", "age": 3, "score": -1.5e3, "tags": ["a", "b"], "kind": "dog", "home": {"city": "Oslo"} }',
     True),
    ('{\n  "name": "Al",\n  "age": 0,\n  "score": null,\n  "tags": [],\n  "kind": 3\n}', True),
    ('{"name":"","age":3,"tags":[]}', False),  # minLength
    ('{"name":"Abcdefghijklm","age":3,"tags":[]}', False),  # maxLength
    ('{"name":"Al","age":-3,"tags":[]}', False),  # minimum 0
    ('{"name":"Al","age":3.5,"tags":[]}', False),  # integer
    ('{"name":"Al","age":3,"tags":["a","b","c","d"]}', False),  # maxItems
    ('{"name":"Al","age":3}', False),  # required
    ('{"age":3,"name":"Al","tags":[]}', False),  # declared order
    ('{"name":"Al","age":3,"tags":[],"kind":"cow"}', False),  # enum
    ('{"name":"Al","age":3,"tags":[],"extra":1}', False),  # additionalProperties
    ('{"name":"Al","age":3,"tags":[],}', False),
    ('{"name":"Al","age":03,"tags":[]}', False),
    ('{"name":"A\\u00e9\\n","age":3,"tags":[]}', True),
    ('{"name":"A\\x","age":3,"tags":[]}', False),
    ('{"name":"A\tb","age":3,"tags":[]}', False),  # raw control character
    ('{"name":"Al","age":3,' + " " * 2 + '"tags":[]}', False),  # whitespace beyond the allowed forms
])
def test_parser_follows_the_schema(text: str, ok: bool) -> None:
    assert accepts(compile_schema(PERSON), text) == ok
    if ok:
        jsonschema.validate(json.loads(text), PERSON)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**18, 10**18)
                    | st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False) | st.text(),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
                    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(), JSON, max_size=5), st.booleans(), st.sampled_from([None, 1, 2]))
def test_every_json_object_is_accepted_in_json_object_mode(doc: dict, ascii_: bool, indent: int | None) -> None:
    text = json.dumps(doc, ensure_ascii=ascii_, indent=indent)
    assert accepts(json_object(), text)
    assert not accepts(json_object(), text[:-1])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=3), JSON, max_size=3), st.integers(0, 10**6), st.text(min_size=1, max_size=2))
def test_whatever_the_parser_accepts_is_valid(doc: dict, where: int, junk: str) -> None:
    """Soundness against mutations: accepted texts always parse (and validate, for the schema)."""
    text = json.dumps(doc)
    k = where % (len(text) + 1)
    for mutated in (text[:k] + junk + text[k:], text[:k] + text[k + 1:]):
        if accepts(json_object(), mutated):
            assert isinstance(json.loads(mutated), dict)
        if accepts(compile_schema(PERSON), mutated):
            jsonschema.validate(json.loads(mutated), PERSON)


@pytest.fixture(scope="module")
def grammars(smol_path: Path) -> Grammars:
    tok = Tokenizer.from_gguf_metadata(GGUFFile(smol_path).metadata)
    return Grammars(tok, tok.vocab_size)


def walk(grammars: Grammars, schema: dict | None, rng: random.Random, steps: int = 400,
         check_every: int = 0) -> bytes | None:
    """Pick random allowed tokens (mostly structural ones, so documents finish); return the finished bytes."""
    c, ix, out = grammars.constraint(schema), grammars.index, b""
    plain = ix.plain.tolist()
    for step in range(steps):
        mask = c.mask()
        if check_every and step % check_every == 0:  # the mask equals checking every token on its own
            allowed = mask.tolist()
            for t in range(ix.vocab_size):
                fits = bool(ix.bytes[t]) and bool(P.advance(c.state, ix.bytes[t]))
                want = P.can_end(c.state) if t in ix.eos else fits
                assert allowed[t] == want, (t, ix.bytes[t], out)
        ids = mask.nonzero().flatten().tolist()
        assert ids, out
        structural = [i for i in ids if not plain[i] or len(ix.bytes[i]) == 1]
        tid = rng.choice(structural if structural and rng.random() < 0.8 else ids)
        if tid in ix.eos:
            return out
        c.advance(tid)
        out += ix.bytes[tid]
        if c.done:
            return out
    return None


@pytest.mark.parametrize("schema", [None, PERSON, TREE], ids=["json_object", "person", "tree"])
def test_random_token_walks_end_in_valid_json(grammars: Grammars, schema: dict | None) -> None:
    rng, finished = random.Random(0), 0
    for k in range(25):
        out = walk(grammars, schema, rng, check_every=97 if k < 2 else 0)
        if out is not None:
            value = json.loads(out.decode("utf-8"))  # whole UTF-8 too: tokens split characters freely
            jsonschema.validate(value, schema or {"type": "object"})
            finished += 1
    assert finished >= 10
