"""JSON Schema -> a small grammar of nodes that parser.py can follow byte by byte.

Only what can be enforced is accepted; anything else raises SchemaError naming the keyword, so a
server can refuse the request instead of silently producing output that does not validate.

What the grammar generates (every output validates against the schema):
- objects: the schema's `properties` in their declared order, required ones always, optional ones
  may be left out; no other keys (allowed or not, they are never needed). Without `properties`,
  any keys, with values under `additionalProperties` (any JSON when absent or true).
- arrays with `items`, `minItems`, `maxItems`; strings with `minLength`, `maxLength`; integers and
  numbers (`minimum: 0` is kept as "no minus sign"); booleans, null; `enum`, `const`; `anyOf`,
  `oneOf` when its options cannot overlap (different JSON types); `type` lists; `$ref` into
  `$defs` / `definitions` (recursion included); `allOf` with one member.
- annotation keywords (title, description, default, examples, ...) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from leanlm.errors import UnsupportedError


class SchemaError(UnsupportedError):
    """The schema uses something we cannot enforce during decoding."""


@dataclass(eq=False)
class Obj:
    props: list[tuple[str, Node, bool]] = field(default_factory=list)  # (name, value, required) in order
    free: Node | None = None  # value of any key, for objects without `properties`
    key_lits: list[Lit] = field(default_factory=list)  # key_lits[i]: keys allowed after property i-1
    key_index: dict[bytes, int] = field(default_factory=dict)  # quoted key -> property index

    def finish(self) -> Obj:
        """Precompute, for each position i, the keys that may come next: props[i..first required]."""
        self.key_index = {_dump(name): i for i, (name, _, _) in enumerate(self.props)}
        self.key_lits = []
        for i in range(len(self.props) + 1):
            names = []
            for name, _, required in self.props[i:]:
                names.append(_dump(name))
                if required:
                    break
            self.key_lits.append(Lit(tuple(names)))
        return self

    def may_close(self, i: int) -> bool:
        """May the object end once properties before index i are done?"""
        return self.free is not None or not any(req for _, _, req in self.props[i:])


@dataclass(eq=False)
class Arr:
    item: Node | None = None
    min: int = 0
    max: int | None = None


@dataclass(eq=False)
class Str:
    min: int = 0
    max: int | None = None


@dataclass(eq=False)
class Num:
    integer: bool = False
    nonneg: bool = False


@dataclass(eq=False)
class Lit:
    texts: tuple[bytes, ...] = ()  # exact JSON texts, e.g. b'"red"', b'true', b'3'


@dataclass(eq=False)
class Alt:
    options: tuple[Node, ...] = ()


Node = Obj | Arr | Str | Num | Lit | Alt

ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "$defs", "definitions", "discriminator", "strict", "name"}


def _dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def any_json() -> Node:
    """Any JSON value (objects and arrays nest any JSON)."""
    value = Alt()
    obj, arr = Obj(free=value).finish(), Arr(item=value)
    value.options = (obj, arr, Str(), Num(), Lit((b"true", b"false", b"null")))
    return value


def json_object() -> Node:
    """response_format {"type": "json_object"}: any JSON object."""
    return Obj(free=any_json()).finish()


def kinds(node: Node, seen: set[int] | None = None) -> set[str]:
    """The JSON types a node can produce (for checking that oneOf options cannot overlap)."""
    seen = seen if seen is not None else set()
    if id(node) in seen:
        return set()
    seen.add(id(node))
    if isinstance(node, Alt):
        return set().union(*(kinds(o, seen) for o in node.options)) if node.options else set()
    if isinstance(node, Lit):
        return {type(json.loads(t)).__name__.replace("int", "float") for t in node.texts}
    return {{Obj: "dict", Arr: "list", Str: "str", Num: "float"}[type(node)]}


class _Compiler:
    def __init__(self, root: dict) -> None:
        self.root = root
        self.refs: dict[str, Alt] = {}

    def ref(self, ref: str) -> Node:
        if ref in self.refs:
            return self.refs[ref]
        if ref == "#":
            target: Any = self.root
        elif ref.startswith(("#/$defs/", "#/definitions/")):
            section, name = ref[2:].split("/", 1)
            target = self.root.get(section, {}).get(name)
            if target is None:
                raise SchemaError(f"$ref '{ref}' points nowhere")
        else:
            raise SchemaError(f"$ref '{ref}' is not supported (only #, #/$defs/... and #/definitions/...)")
        placeholder = self.refs[ref] = Alt()  # recursive schemas refer back to it
        placeholder.options = (self.node(target, ref),)
        return placeholder

    def node(self, s: Any, where: str = "#") -> Node:
        if s is True or s == {}:
            return any_json()
        if not isinstance(s, dict):
            raise SchemaError(f"the schema at {where} is not an object")
        s = {k: v for k, v in s.items() if k not in ANNOTATIONS}
        if "$ref" in s:
            if len(s) > 1:
                raise SchemaError(f"$ref beside other keywords at {where} is not supported")
            return self.ref(s["$ref"])
        if "allOf" in s:
            members = s.pop("allOf")
            if len(members) != 1 or s:
                raise SchemaError(f"allOf at {where} is only supported with one member and nothing beside it")
            return self.node(members[0], where + "/allOf/0")
        if "const" in s or "enum" in s:
            return self.literal(s, where)
        for key in ("anyOf", "oneOf"):
            if key in s:
                return self.alternatives(s, key, where)
        types = s.pop("type", None)
        if types is None:
            types = self.infer_type(s, where)
        results = [self.typed(t, dict(s), where) for t in (types if isinstance(types, list) else [types])]
        left = set.intersection(*(rest for _, rest in results))  # a keyword no listed type uses
        if left:
            raise SchemaError(f"'{sorted(left)[0]}' at {where} is not supported")
        return results[0][0] if len(results) == 1 else Alt(tuple(node for node, _ in results))

    @staticmethod
    def literal(s: dict, where: str) -> Node:
        """const / enum: one of the values, as their JSON texts."""
        values = [s.pop("const")] if "const" in s else s.pop("enum")
        s.pop("type", None)
        if s:
            raise SchemaError(f"'{next(iter(s))}' beside enum/const at {where} is not supported")
        if not values:
            raise SchemaError(f"an empty enum at {where} allows nothing")
        return Lit(tuple(dict.fromkeys(_dump(v) for v in values)))

    def alternatives(self, s: dict, key: str, where: str) -> Node:
        """anyOf / oneOf; oneOf only where its options cannot both match (they differ in JSON type)."""
        options = s.pop(key)
        if s:
            raise SchemaError(f"'{next(iter(s))}' beside {key} at {where} is not supported")
        alt = Alt(tuple(self.node(o, f"{where}/{key}/{i}") for i, o in enumerate(options)))
        if key == "oneOf":
            sets = [kinds(o) for o in alt.options]
            if sum(map(len, sets)) != len(set().union(*sets)):
                raise SchemaError(f"oneOf at {where} has options that can overlap (only options of "
                                  "different JSON types are supported)")
        return alt

    @staticmethod
    def infer_type(s: dict, where: str) -> str:
        if not s:
            return "any"
        for t, keys in (("object", {"properties", "required", "additionalProperties"}),
                        ("array", {"items", "minItems", "maxItems"}), ("string", {"minLength", "maxLength"})):
            if keys & s.keys():
                return t
        raise SchemaError(f"'{next(iter(s))}' at {where} is not supported")

    def typed(self, t: str, s: dict, where: str) -> tuple[Node, set[str]]:
        """The node for one type, and the keywords of s it did not use."""
        def take(key: str, default: Any = None) -> Any:
            return s.pop(key, default)

        if t == "any":
            node: Node = any_json()
        elif t == "object":
            props = take("properties", {})
            required = set(take("required", []))
            extra = take("additionalProperties", True)
            if missing := required - props.keys():
                raise SchemaError(f"required property '{sorted(missing)[0]}' at {where} has no schema")
            obj = Obj([(k, self.node(v, f"{where}/properties/{k}"), k in required) for k, v in props.items()])
            if not props and extra is not False:
                obj.free = self.node(extra, f"{where}/additionalProperties")
            node = obj.finish()
        elif t == "array":
            item = take("items", True)
            lo, hi = take("minItems", 0), take("maxItems")
            if hi is not None and hi < lo:
                raise SchemaError(f"maxItems < minItems at {where}")
            if take("uniqueItems", False):
                raise SchemaError(f"uniqueItems at {where} is not supported")
            node = Arr(self.node(item, f"{where}/items"), lo, hi)
        elif t == "string":
            lo, hi = take("minLength", 0), take("maxLength")
            if hi is not None and hi < lo:
                raise SchemaError(f"maxLength < minLength at {where}")
            node = Str(lo, hi)
        elif t in ("integer", "number"):
            lo = take("minimum")
            if lo is not None and lo != 0:
                raise SchemaError(f"minimum {lo} at {where} is not supported (only minimum 0)")
            node = Num(t == "integer", lo == 0)
        elif t == "boolean":
            node = Lit((b"true", b"false"))
        elif t == "null":
            node = Lit((b"null",))
        else:
            raise SchemaError(f"type '{t}' at {where} is not a JSON Schema type")
        return node, set(s)


def compile_schema(schema: Any) -> Node:
    """The grammar for a JSON Schema (a dict, or True for any JSON). Raises SchemaError."""
    if schema is True:
        return any_json()
    if not isinstance(schema, dict):
        raise SchemaError("the schema must be a JSON object")
    return _Compiler(schema).node(schema)
