"""xl.cfg files: the grammar of Xen's libxlu, with the position of every value.

A file is a sequence of statements ``KEY = VALUE`` or ``KEY += VALUE``, each ended by a
new line or ``;``. A value is a quoted string, a number (decimal, octal with a leading
``0``, hexadecimal with ``0x``) or a list ``[ VALUE, ... ]``, which may nest, span lines
and end with a comma. ``#`` starts a comment that runs to the end of the line.

``KEY = VALUE`` replaces any earlier setting of KEY (the last one wins, as in libxlu).
``KEY += VALUE`` appends: the elements of a list to a list, a string to a string; with no
earlier setting it is a plain assignment. libxlu keeps numbers as their text, so there
``memory = 1`` then ``memory += 28`` means 128; here ``+=`` on a number is an error.

Every error is a :class:`~hvmport.errors.ConfigError` whose text starts with
``SOURCE:LINE:COLUMN:`` (1-based; the column counts characters, a tab is one).

``bare_words=True`` (used for ``xl create`` style command-line overrides) also takes an
unquoted word as a value: ``name=foo`` is the string ``"foo"``, ``memory=0x40`` still the
number 64.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from hvmport.errors import ConfigError

#: What a setting holds once positions are stripped.
Value: TypeAlias = "str | int | list[Value]"

#: Deeper lists than this are refused, so that hostile input cannot exhaust the stack.
MAX_DEPTH = 64

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_NUMBER_RE = re.compile(r"0[xX][0-9A-Fa-f]+|[0-9]+")
_WORD_CHAR_RE = re.compile(r"[A-Za-z0-9_.]")
# A bare word stops where the grammar needs the character for itself.
_BARE_WORD_RE = re.compile(r"[^\s;#,\[\]\"'\x00]+")

_SIMPLE_ESCAPES = {
    "a": 0x07, "b": 0x08, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B,
    "\\": 0x5C, '"': 0x22, "'": 0x27,
}
_HEX_DIGITS = "0123456789abcdefABCDEF"
_OCT_DIGITS = "01234567"


@dataclass(frozen=True, slots=True)
class Position:
    """Where something was written: ``source`` is a file name or ``<command line>``."""

    source: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line}:{self.column}"

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, path=self.source, line=self.line, column=self.column)


@dataclass(frozen=True, slots=True)
class Atom:
    """A string or a number, where it was written."""

    value: str | int
    pos: Position


@dataclass(frozen=True, slots=True)
class ListNode:
    """A list; ``pos`` is its opening bracket."""

    items: tuple[Node, ...]
    pos: Position


Node: TypeAlias = Atom | ListNode


def plain(node: Node) -> Value:
    """The value of ``node`` without positions."""
    if isinstance(node, Atom):
        return node.value
    return [plain(item) for item in node.items]


def describe(node: Node) -> str:
    """A short phrase for error messages: ``number 12``, ``string "x"``, ``a list``."""
    if isinstance(node, ListNode):
        return "a list"
    if isinstance(node.value, int):
        return f"number {node.value}"
    return f"string {render_value(node.value)}"


@dataclass(frozen=True, slots=True)
class Setting:
    """The current value of one key; ``pos`` is the key of the statement that set it last."""

    key: str
    node: Node
    pos: Position

    @property
    def value(self) -> Value:
        return plain(self.node)


class XlConfig(Mapping[str, Value]):
    """Settings in the order their keys first appeared; values without positions.

    :meth:`setting` gives the positions. :meth:`read` parses more statements into the same
    configuration, which is how ``xl create cfg KEY=VALUE...`` applies its extra lines.
    """

    def __init__(self) -> None:
        self._settings: dict[str, Setting] = {}

    def __getitem__(self, key: str) -> Value:
        return plain(self._settings[key].node)

    def __iter__(self) -> Iterator[str]:
        return iter(self._settings)

    def __len__(self) -> int:
        return len(self._settings)

    def __repr__(self) -> str:
        return f"XlConfig({dict(self)!r})"

    def setting(self, key: str) -> Setting:
        return self._settings[key]

    @property
    def settings(self) -> Mapping[str, Setting]:
        return self._settings

    def read(self, text: str, source: str, *, first_line: int = 1,
             bare_words: bool = False) -> None:
        """Parse ``text`` and apply its statements on top of what is already here.

        Nothing is applied when it raises: a file with an error changes nothing.
        """
        staged = dict(self._settings)
        _Parser(_Lexer(text, source, first_line, bare_words), staged).parse()
        self._settings = staged


def parse(text: str, source: str = "<string>", *, first_line: int = 1,
          bare_words: bool = False) -> XlConfig:
    """Parse one xl.cfg text."""
    config = XlConfig()
    config.read(text, source, first_line=first_line, bare_words=bare_words)
    return config


def decode(data: bytes, source: str) -> str:
    """The text of a config file; libxlu takes bytes, we insist on UTF-8 to show them."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[:e.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
        raise ConfigError("file is not valid UTF-8", path=source, line=line,
                          column=column) from None


def parse_file(path: str | os.PathLike[str]) -> XlConfig:
    """Read and parse a config file; errors name it as it was given."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror or e}", path=source) from None
    return parse(decode(data, source), source)


def number_from_text(text: str) -> int | None:
    """The value of a number written as xl writes it, or None if it is not one.

    Raises ConfigError (without a position) for a leading-zero number with 8 or 9 in it,
    which would otherwise be silently read as something else.
    """
    if _NUMBER_RE.fullmatch(text) is None:
        return None
    if text[:2] in ("0x", "0X"):
        return int(text[2:], 16)
    if len(text) > 1 and text[0] == "0":
        if any(c in "89" for c in text):
            raise ConfigError(f"invalid octal number {text} (a leading 0 means octal)")
        return int(text, 8)
    return int(text)


def render_value(value: Value) -> str:
    """xl.cfg text for ``value`` that :func:`parse` reads back as the same value."""
    if isinstance(value, bool):
        raise ValueError("xl.cfg has no booleans; write 0 or 1")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"xl.cfg has no negative numbers: {value}")
        return str(value)
    if isinstance(value, str):
        return _render_string(value)
    return "[" + ", ".join(render_value(v) for v in value) + "]"


def render(settings: Mapping[str, Value]) -> str:
    """A whole file, one setting a line."""
    lines = []
    for key, value in settings.items():
        if _KEY_RE.fullmatch(key) is None:
            raise ValueError(f"not a valid xl.cfg key: {key!r}")
        lines.append(f"{key} = {render_value(value)}\n")
    return "".join(lines)


def _render_string(s: str) -> str:
    out = ['"']
    for c in s:
        if c == "\x00":
            raise ValueError("xl.cfg strings cannot hold NUL")
        if c in "\\\"":
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif ord(c) < 0x20 or c == "\x7f":
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


# --- lexer ---------------------------------------------------------------------------

NAME, NUMBER, STRING, WORD = "name", "number", "string", "word"
EQ, PLUSEQ, LBRACK, RBRACK, COMMA, SEMI, NEWLINE, EOF = (
    "=", "+=", "[", "]", ",", ";", "newline", "eof")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str
    value: str | int | None
    pos: Position


class _Lexer:
    def __init__(self, text: str, source: str, first_line: int, bare_words: bool) -> None:
        self.text = text
        self.source = source
        self.bare_words = bare_words
        self.i = 0
        self.line = first_line
        self.line_start = 0
        self.eof_phrase = "end of argument" if bare_words else "end of file"

    def pos_at(self, i: int) -> Position:
        return Position(self.source, self.line, i - self.line_start + 1)

    def next(self, value: bool) -> _Token:
        """The next token; ``value`` says a value may start here (for bare words)."""
        text = self.text
        n = len(text)
        while self.i < n:
            c = text[self.i]
            if c in " \t\r\f\v":
                self.i += 1
            elif c == "#":
                end = text.find("\n", self.i)
                self.i = n if end < 0 else end
            else:
                break
        start = self.i
        pos = self.pos_at(start)
        if start >= n:
            return _Token(EOF, "", None, pos)
        c = text[start]
        if c == "\n":
            self.i += 1
            self.line += 1
            self.line_start = self.i
            return _Token(NEWLINE, c, None, pos)
        if c in "[],;=":
            self.i += 1
            return _Token(c, c, None, pos)
        if c == "+" and text.startswith("+=", start):
            self.i += 2
            return _Token(PLUSEQ, "+=", None, pos)
        if c in "\"'":
            return self._string(pos)
        if value and self.bare_words:
            m = _BARE_WORD_RE.match(text, start)
            if m is not None:
                return self._bare_word(m.group(), pos)
        if c.isascii() and c.isdigit():
            return self._number(pos)
        m = _KEY_RE.match(text, start)
        if m is not None:
            self.i = m.end()
            return _Token(NAME, m.group(), m.group(), pos)
        raise pos.error(f"unexpected character {c!r}")

    def _bare_word(self, word: str, pos: Position) -> _Token:
        self.i += len(word)
        try:
            number = number_from_text(word)
        except ConfigError:
            number = None
        if number is not None:
            return _Token(NUMBER, word, number, pos)
        return _Token(WORD, word, word, pos)

    def _number(self, pos: Position) -> _Token:
        start = self.i
        m = _NUMBER_RE.match(self.text, start)
        assert m is not None
        end = m.end()
        if end < len(self.text) and _WORD_CHAR_RE.match(self.text[end]):
            # libxlu would split "512M" into a number and a name; one message is clearer.
            while end < len(self.text) and _WORD_CHAR_RE.match(self.text[end]):
                end += 1
            raise pos.error(f"invalid number {self.text[start:end]}")
        self.i = end
        try:
            number = number_from_text(m.group())
        except ConfigError as e:
            raise pos.error(e.message) from None
        assert number is not None
        return _Token(NUMBER, m.group(), number, pos)

    def _string(self, pos: Position) -> _Token:
        text = self.text
        n = len(text)
        start = self.i
        quote = text[start]
        i = start + 1
        out = bytearray()
        while True:
            if i >= n or text[i] == "\n":
                raise pos.error("unterminated string (a string ends on the line it starts)")
            c = text[i]
            if c == quote:
                i += 1
                break
            if c == "\x00":
                raise self.pos_at(i).error("NUL character in a string")
            if c != "\\":
                out += c.encode("utf-8", "surrogatepass")
                i += 1
                continue
            esc_pos = self.pos_at(i)
            if i + 1 >= n or text[i + 1] == "\n":
                raise pos.error("unterminated string (a string ends on the line it starts)")
            e = text[i + 1]
            i += 2
            if e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
            elif e == "x":
                digits = text[i:i + 2]
                if len(digits) < 2 or any(d not in _HEX_DIGITS for d in digits):
                    raise esc_pos.error("\\x in a string must be followed by two hex digits")
                byte = int(digits, 16)
                i += 2
                if byte == 0:
                    raise esc_pos.error("NUL character in a string")
                out.append(byte)
            elif e in _OCT_DIGITS:
                j = i
                while j < n and j < i + 2 and text[j] in _OCT_DIGITS:
                    j += 1
                digits = e + text[i:j]
                i = j
                byte = int(digits, 8)
                if byte > 0xFF:
                    raise esc_pos.error(f"octal escape \\{digits} is above \\377")
                if byte == 0:
                    raise esc_pos.error("NUL character in a string")
                out.append(byte)
            else:
                raise esc_pos.error(
                    f"unknown escape \\{e} in a string (known: \\a \\b \\f \\n \\r \\t \\v "
                    "\\\\ \\\" \\' \\xHH \\OOO)")
        try:
            value = out.decode("utf-8")
        except UnicodeDecodeError:
            raise pos.error("string is not valid UTF-8 (check its \\x and octal escapes)") \
                from None
        self.i = i
        return _Token(STRING, text[start:i], value, pos)

    def phrase(self, tok: _Token) -> str:
        """How an error names what it found."""
        if tok.kind == EOF:
            return self.eof_phrase
        if tok.kind == NEWLINE:
            return "end of line"
        if tok.kind == NAME:
            return f"name {tok.text!r}"
        if tok.kind == NUMBER:
            return f"number {tok.text}"
        if tok.kind in (STRING, WORD):
            return f"string {render_value(str(tok.value))}"
        return f"'{tok.text}'"


# --- parser ----------------------------------------------------------------------------

class _Parser:
    def __init__(self, lexer: _Lexer, settings: dict[str, Setting]) -> None:
        self.lex = lexer
        self.settings = settings

    def parse(self) -> None:
        lex = self.lex
        while True:
            tok = lex.next(value=False)
            if tok.kind in (NEWLINE, SEMI):
                continue
            if tok.kind == EOF:
                return
            if tok.kind != NAME:
                raise tok.pos.error(f"expected a setting name, found {lex.phrase(tok)}")
            op = lex.next(value=False)
            if op.kind not in (EQ, PLUSEQ):
                raise op.pos.error(
                    f"expected '=' or '+=' after {tok.text!r}, found {lex.phrase(op)}")
            node = self.value(lex.next(value=True), 0)
            end = lex.next(value=False)
            if end.kind not in (NEWLINE, SEMI, EOF):
                raise end.pos.error(
                    f"expected ';' or a new line after the value of {tok.text!r}, "
                    f"found {lex.phrase(end)}")
            self.store(tok.text, op.kind, node, tok.pos)

    def value(self, tok: _Token, depth: int) -> Node:
        if tok.kind in (STRING, NUMBER, WORD):
            assert tok.value is not None
            return Atom(tok.value, tok.pos)
        if tok.kind == LBRACK:
            return self.list(tok.pos, depth + 1)
        hint = ""
        if tok.kind == NAME:
            hint = f" (strings need quotes: \"{tok.text}\")"
        raise tok.pos.error(f"expected a value, found {self.lex.phrase(tok)}{hint}")

    def list(self, open_pos: Position, depth: int) -> ListNode:
        if depth > MAX_DEPTH:
            raise open_pos.error(f"lists nested more than {MAX_DEPTH} deep")
        items: list[Node] = []
        tok = self.skip_newlines(value=True)
        while tok.kind != RBRACK:
            if tok.kind == EOF:
                raise open_pos.error(f"list is never closed: ']' missing before "
                                     f"{self.lex.eof_phrase}")
            items.append(self.value(tok, depth))
            tok = self.skip_newlines(value=False)
            if tok.kind == RBRACK:
                break
            if tok.kind == EOF:
                raise open_pos.error(f"list is never closed: ']' missing before "
                                     f"{self.lex.eof_phrase}")
            if tok.kind != COMMA:
                raise tok.pos.error(f"expected ',' or ']' in a list, found "
                                    f"{self.lex.phrase(tok)}")
            tok = self.skip_newlines(value=True)
        return ListNode(tuple(items), open_pos)

    def skip_newlines(self, value: bool) -> _Token:
        tok = self.lex.next(value)
        while tok.kind == NEWLINE:
            tok = self.lex.next(value)
        return tok

    def store(self, key: str, op: str, node: Node, pos: Position) -> None:
        prev = self.settings.get(key)
        if op == PLUSEQ and prev is not None:
            node = _concat(key, prev, node)
        self.settings[key] = Setting(key, node, pos)


def _concat(key: str, prev: Setting, node: Node) -> Node:
    old = prev.node
    if isinstance(old, ListNode) and isinstance(node, ListNode):
        return ListNode(old.items + node.items, node.pos)
    if isinstance(old, ListNode) or isinstance(node, ListNode):
        raise node.pos.error(
            f"cannot add {describe(node)} to {describe(old)} with += "
            f"({key} was set at {prev.pos}); += adds a list to a list, a string to a string")
    if isinstance(old.value, str) and isinstance(node.value, str):
        return Atom(old.value + node.value, node.pos)
    raise node.pos.error(
        f"+= cannot add {describe(node)} to {describe(old)} ({key} was set at {prev.pos}); "
        "+= adds a list to a list, a string to a string")
