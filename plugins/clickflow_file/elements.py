"""Where an array element ends when ``json``'s scanner cannot read it (``reader.iter_array``):
by its brackets (``Extent``), or, if they never balance, where the next element starts
(``Resync``)."""

from __future__ import annotations

import json
import re

WHITESPACE = " \t\r\n"
scan = json.JSONDecoder().raw_decode
"""A JSON value's end in a text, or an error (``json`` reads it, up to its recursion limit)."""
_NOT_WHITESPACE = re.compile(r"[^ \t\r\n]")


def past_whitespace(buf: str, at: int) -> int:
    """Where the first character of ``buf`` from ``at`` on that is not whitespace is; ``len(buf)`` if none."""
    found = _NOT_WHITESPACE.search(buf, at)
    return found.start() if found else len(buf)


def next_character(buf: str, at: int) -> str | None:
    """The first character of ``buf`` from ``at`` on that is not whitespace; None if ``buf`` ends first."""
    at = past_whitespace(buf, at)
    return buf[at] if at < len(buf) else None


_NEXT_OBJECT = re.compile(r",(?:[ \t\r]*\n(?:[ \t\r]*\n)*(?P<indent>[ \t]*)|[ \t\r]*)(?=\{)")
"""A comma before an object: at the end of a line, with the indentation of the next line that is
not blank, if that line starts with the object (``indent`` is None if the object is on the
comma's line)."""
_LOOK_AHEAD = 1 << 20
"""How much text an object at the start of a line may need before it is judged."""
RUN_ON = 1 << 20
"""How long a run of whole elements after a comma within a line must be, if the array's closing
bracket does not end it, to be the array's rest."""
_MAX_TRIES = 100
"""Places judged per broken element at most: a hostile one of lines that each open one more
bracket made ``json`` read a thousand lines for each (15 s a megabyte)."""


class Resync:
    """Where an array element that ``json``'s scanner cannot read ends if its brackets do not
    balance (one cut short, or with a string left open), so that it does not take what follows it
    along: before a comma followed by an object that starts the next element.

    - At the end of a line: if the next line, no more indented than the element's first, starts
      with a whole object followed by a comma or the array's closing bracket. An array written one
      element per line, or indented, goes on there.
    - Within a line (an array on one line, as ``json.dump`` writes it): if whole values separated
      by commas run from the object to a closing bracket that ends its line, or for ``RUN_ON``
      characters. A run of objects nested in the broken element ends inside it, as a bracket
      that other text follows.

    ``find`` is called again, with more text, while it finds nothing."""

    def __init__(self, column: int) -> None:
        self._column = column
        self._scanned = 0
        """How far past the element's start the text is searched."""
        self._tries = _MAX_TRIES

    def find(self, buf: str, start: int, end: int, eof: bool) -> int:
        """The index in ``buf`` where the element at ``start`` ends, if an object before ``end``
        (the end its brackets give, or -1) starts the next element; else -1."""
        at, stop = start + self._scanned, len(buf) if end == -1 else end
        while self._tries and (match := _NEXT_OBJECT.search(buf, at, stop)) is not None:
            indent = match.group("indent")
            if indent is None:
                starts, at = _starts_run(buf, match.end(), eof)
                if starts is None:  # the text ends before the run can be judged
                    at = match.start()
                    break
                if starts:
                    return start + len(buf[start : match.start()].rstrip(WHITESPACE))
                self._tries -= 1  # and any comma before ``at``, in the run or nested in it, fails alike
                continue
            if len(indent) <= self._column:
                try:
                    after = scan(buf, match.end())[1]
                except (json.JSONDecodeError, RecursionError):
                    if not eof and len(buf) - match.end() < _LOOK_AHEAD:
                        break  # perhaps cut off by the buffer: judged again with more text
                else:
                    follows = next_character(buf, after)
                    if follows in (",", "]"):
                        return start + len(buf[start : match.start()].rstrip(WHITESPACE))
                    if follows is None and not eof:
                        break
                self._tries -= 1
            at = match.start() + 1
        else:  # a match may begin at a last comma that only whitespace follows, and end in text not read yet
            last = buf.rfind(",", at, stop)
            at = last if last != -1 and not buf[last + 1 : stop].strip(WHITESPACE) else stop
        self._scanned = at - start
        return -1


def _starts_run(buf: str, at: int, eof: bool) -> tuple[bool | None, int]:
    """Whether whole values separated by commas run from ``at`` to a closing bracket that only
    whitespace follows on its line, or for ``RUN_ON`` characters; None if ``buf`` ends before that
    can be told. With False, where the run broke."""
    first = at
    while at - first < RUN_ON:
        try:
            at = scan(buf, at)[1]
        except json.JSONDecodeError as exc:
            return (None if not eof and _cut_off(exc, buf) else False), at
        except RecursionError:
            return False, at
        at = past_whitespace(buf, at)
        if at == len(buf):
            return (None if not eof else False), at
        if buf[at] == "]":
            line_end = buf.find("\n", at)
            rest = buf[at + 1 : line_end if line_end != -1 else len(buf)]
            if rest.strip(WHITESPACE):
                return False, at
            return (None if line_end == -1 and not eof else True), at
        if buf[at] != ",":
            return False, at
        at = past_whitespace(buf, at + 1)
    return True, at


def _cut_off(error: json.JSONDecodeError, text: str) -> bool:
    """Whether ``json`` failed only for want of more text: in a string, or within a token's length
    (``-Infinity``) of the end."""
    return error.msg.startswith("Unterminated string") or error.pos >= len(text) - len("-Infinity")


_BRACKETS_OR_QUOTE = re.compile(r'[\[{]+|[\]}]+|"')
"""A run of opening brackets, a run of closing ones, or a string's opening quote."""
_COMMA_BRACKET_OR_QUOTE = re.compile(r'[\[\]{}",]')
"""What ends an element that does not start with a bracket: a comma or closing bracket outside
brackets and strings; brackets and quotes are counted on the way."""
_IN_STRING = re.compile(r'(?:[^"\\]++|\\.)*+', re.DOTALL)
"""A string's characters: up to its closing quote, or where the text ends (before a lone backslash)."""


class Extent:
    """Where an array element that ``json``'s scanner cannot read ends, found by counting
    brackets outside strings: at its closing bracket if it starts with one (``bracketed``), else
    before the comma or closing bracket that follows it. ``end`` is called again, with more text,
    while the element is cut off.

    It does not check the element: that is the parser's, which dead-letters it (as malformed, or
    as too deep)."""

    def __init__(self, bracketed: bool) -> None:
        self._bracketed = bracketed
        self._tokens = _BRACKETS_OR_QUOTE if bracketed else _COMMA_BRACKET_OR_QUOTE
        self._scanned = 0
        """How far past the value's start the text is counted."""
        self._depth = 0
        self._in_string = False

    def forget(self) -> int:
        """How far the text is counted from the value's start, which moves there: the text before
        it is not read again, so a caller may drop it."""
        counted, self._scanned = self._scanned, 0
        return counted

    def end(self, buf: str, start: int) -> int:
        """The index in ``buf`` just past the value at ``start``, or -1 if ``buf`` ends first."""
        at, depth, in_string = start + self._scanned, self._depth, self._in_string
        while True:
            if in_string:
                at = _IN_STRING.match(buf, at).end()  # type: ignore[union-attr]  # it matches an empty string
                if at == len(buf) or buf[at] != '"':  # cut off, perhaps before an escape's backslash
                    break
                at, in_string = at + 1, False
            match = self._tokens.search(buf, at)
            if match is None:
                at = len(buf)
                break
            token, at = match.group(), match.end()
            if token == '"':
                in_string = True
            elif token[0] in "[{":
                depth += len(token)
            elif self._bracketed:
                depth -= len(token)
                if depth <= 0:  # closers past the element's own belong to the array
                    return at + depth
            elif depth == 0 and token in ",]":  # the array's: the element ends before it
                return start + len(buf[start : match.start()].rstrip(WHITESPACE))
            elif depth > 0 and token in "]}":
                depth -= 1
        self._scanned, self._depth, self._in_string = at - start, depth, in_string
        return -1
