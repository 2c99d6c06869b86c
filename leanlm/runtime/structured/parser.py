"""A byte-level pushdown parser for the grammar of schema.py.

A parse *stack* is a tuple of frames (tuples, so stacks hash and share structure); the parser *state* is
the frozenset of stacks still alive, because `anyOf` and number literals can be ambiguous for a while.
`advance(state, byte)` returns the next state; an empty one means the byte is not allowed.

Frames (the bottom one is always the root):
  ("r", node, phase)                      phase 0: the value comes next, 1: done
  ("o", obj, phase, i, ws)                object; i = index of the current property (prop objects)
  ("a", arr, phase, count, ws)            array with `count` items begun
  ("s", min, max, count, esc, pending)    inside a string: `count` characters so far, `esc` escape state
                                          (0 none, 1 after backslash, 2..5 in \\uXXXX), `pending` UTF-8
                                          continuation bytes still due (and their range, see feed)
  ("n", integer, phase, digits)           number (phases in NUM_NEXT's comment)
  ("l", texts, pos)                       literals (enum/const/true/...) all agreeing on their first pos bytes

Whitespace between tokens follows llama.cpp's JSON grammars: nothing, one space, or a newline and up to
20 spaces or tabs, so a model cannot stall in endless whitespace. `ws` counts it: 0 none, 1 one space
(no more allowed), 2 + k: a newline and k indent characters.

Example: feeding b'{"a":1}' to the schema {"properties": {"a": {"type": "integer"}}, "required": ["a"]}
  {  -> root done-after-child, push ("o", obj, 0, -1, 0)
  "  -> the object begins key literal b'"a"' (its only allowed key): push ("l", (b'"a"',), 1)
  a" -> the literal completes; the object learns the key's index: ("o", obj, 2, 0, 0)
  :  -> phase 3 (value next); 1 -> push ("n", True, 2, 1)
  }  -> not a digit: the number is complete, pops, and the byte goes to the object, which may close.
"""

from __future__ import annotations

from leanlm.runtime.structured.schema import Alt, Arr, Node, Num, Obj, Str

Stack = tuple[tuple, ...]
State = frozenset[Stack]

DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
WS = frozenset(b" \t\n")
# allowed range of the byte after a UTF-8 lead byte: any continuation, or the narrower ranges that rule
# out overlong forms (E0, F0), surrogates (ED) and code points above U+10FFFF (F4)
UTF8_NEXT = ((0x80, 0xBF), (0xA0, 0xBF), (0x80, 0x9F), (0x90, 0xBF), (0x80, 0x8F))
MAX_DIGITS = 20  # per part of a number: keeps a model from writing digits forever
NUM_DONE = frozenset((1, 2, 4, 7))  # phases where the number may end
# number phases: 0 after '-', 1 int is 0, 2 int digits, 3 after '.', 4 fraction, 5 after e, 6 exp sign, 7 exp


def ws_step(ws: int, b: int) -> int | None:
    if b == 0x20 and ws == 0:
        return 1
    if b == 0x0A and ws == 0:
        return 2
    if b in (0x20, 0x09) and 2 <= ws < 22:
        return ws + 1
    return None


def initial(node: Node) -> State:
    return frozenset({(("r", node, 0),)})


def begin(stack: Stack, node: Node, b: int) -> list[Stack]:
    """Stacks after `node`'s value starts with byte b on top of stack."""
    if isinstance(node, Alt):
        return [s for o in node.options for s in begin(stack, o, b)]
    if isinstance(node, Obj):
        return [stack + (("o", node, 0, -1, 0),)] if b == 0x7B else []
    if isinstance(node, Arr):
        return [stack + (("a", node, 0, 0, 0),)] if b == 0x5B else []
    if isinstance(node, Str):
        return [stack + (("s", node.min, node.max, 0, 0, 0),)] if b == 0x22 else []
    if isinstance(node, Num):
        if b == 0x2D and not node.nonneg:
            return [stack + (("n", node.integer, 0, 0),)]
        if b in DIGITS:
            return [stack + (("n", node.integer, 1 if b == 0x30 else 2, 1),)]
        return []
    texts = tuple(t for t in node.texts if t[0] == b)
    out = [s for t in texts if len(t) == 1 for s in finish(stack, t)]
    longer = tuple(t for t in texts if len(t) > 1)
    return out + ([stack + (("l", longer, 1),)] if longer else [])


def finish(stack: Stack, result: bytes | None) -> list[Stack]:
    """The top value of stack (already popped) completed with `result`: let the parent take note."""
    parent = stack[-1]
    if parent[0] == "o" and parent[2] == 1:  # a key ended: which property is it?
        obj = parent[1]
        i = obj.key_index[result] if obj.free is None else parent[3]
        return [stack[:-1] + (("o", obj, 2, i, 0),)]
    return [stack]


def feed(stack: Stack, b: int) -> list[Stack]:
    """Stacks after consuming byte b (empty if b is not allowed)."""
    top = stack[-1]
    return _FEED[top[0]](top, stack[:-1], b)


def _feed_string(top: tuple, rest: Stack, b: int) -> list[Stack]:
    _, lo, hi, count, esc, pending = top
    if pending or esc:
        return _feed_string_escape(top, rest, b)
    if b == 0x22:
        return finish(rest, None) if count >= lo else []
    if hi is not None and count >= hi or b < 0x20:
        return []
    if b == 0x5C:
        return [rest + (("s", lo, hi, count, 1, 0),)]
    if b < 0x80:
        return [rest + (("s", lo, hi, _count(top), 0, 0),)]
    more = 1 if 0xC2 <= b < 0xE0 else 2 if 0xE0 <= b < 0xF0 else 3 if 0xF0 <= b < 0xF5 else 0
    more |= {0xE0: 1, 0xED: 2, 0xF0: 3, 0xF4: 4}.get(b, 0) << 2
    return [rest + (("s", lo, hi, _count(top), 0, more),)] if more else []


def _feed_string_escape(top: tuple, rest: Stack, b: int) -> list[Stack]:
    """Inside a string: a UTF-8 continuation byte that is due, or the rest of an escape (\\x, \\uXXXX)."""
    _, lo, hi, count, esc, pending = top
    if pending:  # low 2 bits: continuation bytes due; above: UTF8_NEXT's range for the next one
        low, high = UTF8_NEXT[pending >> 2]
        return [rest + (("s", lo, hi, count, 0, (pending & 3) - 1),)] if low <= b <= high else []
    if esc == 1:
        if b in ESCAPES:
            return [rest + (("s", lo, hi, _count(top), 0, 0),)]
        return [rest + (("s", lo, hi, count, 2, 0),)] if b == 0x75 else []
    if b not in HEX:
        return []
    return [rest + (("s", lo, hi, _count(top), 0, 0) if esc == 5 else ("s", lo, hi, count, esc + 1, 0),)]


def _feed_literal(top: tuple, rest: Stack, b: int) -> list[Stack]:
    _, texts, pos = top
    texts = tuple(t for t in texts if t[pos] == b)
    out = [s for t in texts if len(t) == pos + 1 for s in finish(rest, t)]
    longer = tuple(t for t in texts if len(t) > pos + 1)
    return out + ([rest + (("l", longer, pos + 1),)] if longer else [])


def _feed_number(top: tuple, rest: Stack, b: int) -> list[Stack]:
    _, integer, phase, digits = top
    nxt = _num_next(integer, phase, digits, b)
    if nxt is not None:
        return [rest + (("n", integer) + nxt,)]
    if phase in NUM_DONE:  # the number ended just before b: pop, then b goes to the parent
        return [s2 for s in finish(rest, None) for s2 in feed(s, b)]
    return []


def _feed_array(top: tuple, rest: Stack, b: int) -> list[Stack]:
    _, arr, phase, count, ws = top
    w = ws_step(ws, b)
    if w is not None:
        return [rest + (("a", arr, phase, count, w),)]
    if phase == 1:
        if b == 0x2C and (arr.max is None or count < arr.max):
            return [rest + (("a", arr, 2, count, 0),)]
        return finish(rest, None) if b == 0x5D and count >= arr.min else []
    if phase == 0 and b == 0x5D and arr.min == 0:
        return finish(rest, None)
    if arr.max is not None and count >= arr.max:
        return []
    n = count + 1 if arr.min or arr.max is not None else 0  # untracked when unbounded (states repeat)
    return begin(rest + (("a", arr, 1, n, 0),), arr.item, b)


def _feed_root(top: tuple, rest: Stack, b: int) -> list[Stack]:
    return begin(rest + (("r", top[1], 1),), top[1], b) if top[2] == 0 else []


def _count(top: tuple) -> int:
    """Characters in a string frame after one more; untracked (0) when the string has no bounds."""
    _, lo, hi, count, _, _ = top
    if hi is None:
        return min(count + 1, lo)  # only minLength matters: saturate so states repeat
    return count + 1


def _num_next(integer: bool, phase: int, digits: int, b: int) -> tuple[int, int] | None:
    """The number frame's next (phase, digits) after byte b; None if b cannot continue the number."""
    if b in DIGITS:
        return _num_digit(phase, digits, b)
    if integer:
        return None
    if b == 0x2E and phase in (1, 2):
        return 3, 0
    if b in (0x65, 0x45) and phase in (1, 2, 4):
        return 5, 0
    if b in (0x2B, 0x2D) and phase == 5:
        return 6, 0
    return None


def _num_digit(phase: int, digits: int, b: int) -> tuple[int, int] | None:
    if phase == 0:
        return (1 if b == 0x30 else 2), 1
    if phase in (2, 4, 7) and digits < (3 if phase == 7 else MAX_DIGITS):
        return phase, digits + 1
    if phase in (3, 5, 6):
        return phase + 1 if phase != 5 else 7, 1
    return None


def _feed_object(top: tuple, rest: Stack, b: int) -> list[Stack]:
    _, obj, phase, i, ws = top
    w = ws_step(ws, b)
    if w is not None:
        return [rest + (("o", obj, phase, i, w),)]
    if phase in (0, 5) and b == 0x22:
        key: Node = Str() if obj.free is not None else obj.key_lits[i + 1]
        return begin(rest + (("o", obj, 1, i, 0),), key, b)
    if phase == 0 and b == 0x7D and obj.may_close(0):
        return finish(rest, None)
    if phase == 2:
        return [rest + (("o", obj, 3, i, 0),)] if b == 0x3A else []
    if phase == 3:
        value = obj.free if obj.free is not None else obj.props[i][1]
        return begin(rest + (("o", obj, 4, i, 0),), value, b)
    if phase == 4:
        if b == 0x2C and (obj.free is not None or i + 1 < len(obj.props)):
            return [rest + (("o", obj, 5, i, 0),)]
        if b == 0x7D and obj.may_close(i + 1):
            return finish(rest, None)
    return []


def advance(state: State, data: bytes) -> State:
    """The state after consuming data; empty if some byte is not allowed."""
    for b in data:
        state = frozenset(s2 for s in state for s2 in feed(s, b))
        if not state:
            break
    return state


def can_end(state: State) -> bool:
    """May the output end here (the root value complete, or a number that may stop)?"""
    for stack in state:
        while stack[-1][0] == "n" and stack[-1][2] in NUM_DONE:
            stack = finish(stack[:-1], None)[0]
        if stack[-1][0] == "r" and stack[-1][2] == 1:
            return True
    return False


def done(state: State) -> bool:
    """Nothing but the end can follow (every stack is a finished root)."""
    return all(len(s) == 1 and s[0][2] == 1 for s in state)


# frame kind -> how it takes the next byte (the frame layouts are in the module docstring)
_FEED = {"s": _feed_string, "l": _feed_literal, "n": _feed_number, "o": _feed_object, "a": _feed_array,
         "r": _feed_root}
