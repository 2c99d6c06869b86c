"""Structured output: JSON (any object, or a JSON Schema) enforced token by token while decoding."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from leanlm.runtime.structured.schema import SchemaError, compile_schema, json_object
from leanlm.runtime.structured.vocab import Constraint, Grammar, TokenIndex

__all__ = ["Constraint", "Grammar", "Grammars", "SchemaError", "TokenIndex"]


class Grammars:
    """Compiled grammars for one model's vocabulary, kept by schema so repeated requests reuse their masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, keep: int = 16) -> None:
        self.tokenizer, self.vocab_size, self.keep = tokenizer, vocab_size, keep
        self._index: TokenIndex | None = None
        self._grammars: OrderedDict[str, Grammar] = OrderedDict()

    @property
    def index(self) -> TokenIndex:
        if self._index is None:
            self._index = TokenIndex(self.tokenizer, self.vocab_size)
        return self._index

    def get(self, schema: Any = None) -> Grammar:
        """The grammar for a JSON Schema, or for any JSON object when schema is None. Raises SchemaError."""
        key = json.dumps(schema, sort_keys=True)
        g = self._grammars.get(key)
        if g is None:
            node = json_object() if schema is None else compile_schema(schema)
            g = self._grammars[key] = Grammar(node, self.index)
            if len(self._grammars) > self.keep:
                self._grammars.popitem(last=False)
        self._grammars.move_to_end(key)
        return g

    def constraint(self, schema: Any = None) -> Constraint:
        return Constraint(self.get(schema))
