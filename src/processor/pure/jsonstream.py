"""Read a JSON array fed in chunks, one element at a time, each element on its own.

The pending list can be very long (CONTRACT.md §1), so it is read as a stream. A bad value
must stay confined to its own entry: an integer beyond 64 bits, a lone surrogate escape
(`"\\udc00"`), bytes that are not UTF-8 or an entry nested too deep spoil that entry only.
So the body is not handed to one streaming parser (whose first error ends the whole read):
`ArraySplitter` finds where each top-level element begins and ends (it tracks strings and
nesting, nothing else), and `decode_element` decodes each element alone.

What `decode_element` returns is always a value `orjson` can serialise: a string that is
not valid Unicode becomes an `InvalidValue` that says so, an integer outside 64 bits a float
(as orjson reads it). An element that is not JSON at all, is larger than
`MAX_ELEMENT_BYTES` or nested deeper than `MAX_DEPTH` becomes an `InvalidValue` too.

A body that is not an array (`{}`, `null`, an HTML page), a truncated one or one with data
after the closing bracket raises `MalformedBody`: the answer as a whole is unusable.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
import orjson

# An element larger than this is not kept in memory: it is read past and reported as
# unreadable (a task's text is at most 10,000 characters: about 60 KB even escaped).
MAX_ELEMENT_BYTES = 4 * 1024 * 1024
# An element nested deeper than this is unreadable (a task is 3 levels deep; orjson, which
# logs and fingerprints entries downstream, cannot serialise more than 254 levels).
MAX_DEPTH = 128

_WS = re.compile(rb"[ \t\r\n]*+")
# Everything up to the next character that matters, complete strings included. At depth 0
# a comma ends the element; inside an object or array only brackets and quotes matter.
_RUN_TOP = re.compile(rb'(?:[^"\[\]{},]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+', re.S)
_RUN_NESTED = re.compile(rb'(?:[^"\[\]{}]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+', re.S)
_STRING_REST = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.S)
_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1


class MalformedBody(Exception):
    """The body is not a JSON array (or was cut off, or has data after it)."""


@attrs.frozen
class InvalidValue:
    """A value from the wire with no faithful form here; `what` says why, for a person."""

    what: str

    def __str__(self) -> str:
        return f"<invalid: {self.what}>"


def unicode_problem(s: str) -> str | None:
    """None if `s` is valid Unicode (encodable as UTF-8), else what is wrong with it."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode (a lone surrogate or a byte that is not UTF-8, \\u{ord(s[exc.start]):04x}, at index {exc.start})"
    return None


def printable(s: str, limit: int = 64) -> str:
    """`s` cut to `limit` characters, with anything that is not valid Unicode escaped."""
    s = s[:limit]
    return s if unicode_problem(s) is None else s.encode("utf-8", "backslashreplace").decode("utf-8")


class ArraySplitter:
    """Feed the body in chunks; get back each complete top-level element's bytes.

    `feed` returns the elements completed by that chunk (an element too large to keep comes
    back as an `InvalidValue`); `close` checks that the array was complete. Never raises
    anything but `MalformedBody`.
    """

    def __init__(self, max_element_bytes: int = MAX_ELEMENT_BYTES) -> None:
        self._max = max_element_bytes
        self._buf = bytearray()
        self._pos = 0  # scanned up to here
        self._phase = 0  # 0: before '[', 1: between elements, 2: in an element, 3: after ']'
        self._expect_value = True  # between elements: a value may come (after '[' or ',')
        self._start = 0  # start of the current element in _buf
        self._depth = 0
        self._in_string = False
        self._oversize = False
        self._too_deep = False
        self.elements = 0
        self._error: MalformedBody | None = None

    def feed(self, chunk: bytes) -> list[bytes | InvalidValue]:
        if self._error is not None:
            raise self._error
        out: list[bytes | InvalidValue] = []
        self._buf += chunk
        try:
            self._scan(out)
        except MalformedBody as exc:
            if not out:
                raise
            self._error = exc  # hand out what came before it first
            return out
        # keep only what the current element still needs
        keep_from = self._start if self._phase == 2 and not self._oversize else self._pos
        if keep_from > 0:
            del self._buf[:keep_from]
            self._pos -= keep_from
            self._start -= keep_from
        return out

    def close(self) -> None:
        if self._error is not None:
            raise self._error
        if self._phase == 0:
            raise MalformedBody("the body is empty, not a JSON array")
        if self._phase != 3:
            raise MalformedBody(f"the body ends inside the array, after {self.elements} entries (cut off?)")

    def _fail(self, what: str) -> MalformedBody:
        self._phase = 4  # nothing more is read
        return MalformedBody(what)

    def _scan(self, out: list[bytes | InvalidValue]) -> None:
        buf = self._buf
        n = len(buf)
        while self._pos < n:
            phase = self._phase
            if phase == 2:
                if not self._scan_element(out):
                    return
                continue
            m = _WS.match(buf, self._pos)
            i = self._pos = m.end() if m else self._pos
            if i >= n:
                return
            c = buf[i : i + 1]
            if phase == 0:
                if c != b"[":
                    raise self._fail(f"the body is not a JSON array (it starts with {_show(buf[i : i + 40])})")
                self._phase, self._pos = 1, i + 1
            elif phase == 1:
                if c == b"]":
                    if self._expect_value and self.elements:  # ']' right after '[' closes an empty array
                        raise self._fail(f"the array has a trailing comma after entry {self.elements}")
                    self._phase, self._pos = 3, i + 1
                elif c == b",":
                    if self._expect_value:
                        raise self._fail(f"the array has an empty entry after entry {self.elements}")
                    self._expect_value, self._pos = True, i + 1
                else:
                    if not self._expect_value:
                        raise self._fail(f"the array lacks a comma after entry {self.elements}")
                    self._phase, self._start, self._depth = 2, i, 0
                    self._oversize = self._too_deep = False
            elif phase == 3:
                raise self._fail(f"the body has data after the array: {_show(buf[i : i + 40])}")
            else:
                return

    def _scan_element(self, out: list[bytes | InvalidValue]) -> bool:
        """Scan the current element; True when it ended (or the caller should continue)."""
        buf = self._buf
        n = len(buf)
        pos = self._pos
        if self._in_string:
            m = _STRING_REST.match(buf, pos)
            pos = m.end() if m else pos
            if pos >= n or (buf[pos : pos + 1] == b"\\" and pos + 1 >= n):
                self._pos = pos
                return self._check_size()
            self._in_string = False
            pos += 1  # the closing quote
        while True:
            m = (_RUN_NESTED if self._depth else _RUN_TOP).match(buf, pos)
            pos = m.end() if m else pos
            if pos >= n:
                self._pos = pos
                return self._check_size()
            c = buf[pos]
            if c == 0x22:  # '"' that did not close within the buffer: resume inside it
                self._in_string = True
                self._pos = pos + 1
                return self._scan_element(out) if pos + 1 < n else self._check_size()
            if c in b"[{":
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    self._too_deep = True
            elif c in b"]}":
                if self._depth == 0:
                    if c == 0x7D:
                        raise self._fail(f"unbalanced '}}' in entry {self.elements + 1}")
                    self._end_element(out, pos)
                    self._phase, self._pos = 3, pos + 1
                    return True
                self._depth -= 1
            else:  # ',' at depth 0
                self._end_element(out, pos)
                self._phase, self._expect_value, self._pos = 1, True, pos + 1
                return True
            pos += 1

    def _check_size(self) -> bool:
        if not self._oversize and self._pos - self._start > self._max:
            self._oversize = True
        return False

    def _end_element(self, out: list[bytes | InvalidValue], end: int) -> None:
        self.elements += 1
        self._expect_value = False
        if self._oversize or end - self._start > self._max:
            out.append(InvalidValue(f"entry {self.elements} is larger than {self._max} bytes"))
        elif self._too_deep:
            out.append(InvalidValue(f"entry {self.elements} is nested deeper than {MAX_DEPTH} levels"))
        else:
            out.append(bytes(self._buf[self._start : end]))
        self._oversize = False


def _show(b: bytes | bytearray) -> str:
    return repr(b.decode("utf-8", "replace"))


def decode_element(raw: bytes | InvalidValue) -> Any:
    """One element's value; never raises. See the module docstring for what comes back."""
    if isinstance(raw, InvalidValue):
        return raw
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses lone surrogates, bytes that are not UTF-8, numbers beyond a double and
    # deep nesting: read those with the tolerant parser and mark what is wrong.
    try:
        value = json.loads(raw.decode("utf-8", "surrogateescape"))
        return _clean(value, 0)
    except (ValueError, RecursionError, _TooDeep):
        return InvalidValue(f"entry is not valid JSON: {_show(raw[:60])}")


class _TooDeep(Exception):
    pass


def _clean(v: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise _TooDeep
    if isinstance(v, str):
        problem = unicode_problem(v)
        return v if problem is None else InvalidValue(f"text {problem}")
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        if _INT64_MIN <= v <= _UINT64_MAX:
            return v
        try:
            return float(v)
        except OverflowError:
            return InvalidValue("number out of range")
    if isinstance(v, float):
        return v
    if isinstance(v, list):
        return [_clean(x, depth + 1) for x in v]
    if isinstance(v, dict):
        return {(k if unicode_problem(k) is None else printable(k, 1000)): _clean(x, depth + 1) for k, x in v.items()}
    return InvalidValue(f"unexpected {type(v).__name__}")  # pragma: no cover - json gives no other types
