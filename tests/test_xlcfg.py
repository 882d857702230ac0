"""xl.cfg grammar (libxlu's): values, lists, comments, +=, overrides, and exact error positions."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvmport.errors import ConfigError
from hvmport.toolstack import xlcfg


def test_statements_end_with_newline_or_semicolon_and_comments_are_skipped() -> None:
    cfg = xlcfg.parse('name = "a" # the name\nmemory=128; vcpus = 2\n\n# only a comment\n'
                      'kernel="k"')
    assert dict(cfg) == {"name": "a", "memory": 128, "vcpus": 2, "kernel": "k"}


@pytest.mark.parametrize(("text", "value"), [
    ("x = 0x40", 64), ("x = 0X1f", 31), ("x = 010", 8), ("x = 0", 0), ("x = 4096", 4096),
])
def test_numbers_decimal_octal_hex(text: str, value: int) -> None:
    assert xlcfg.parse(text)["x"] == value


def test_a_leading_zero_with_8_or_9_is_an_error_not_a_silent_decimal() -> None:
    with pytest.raises(ConfigError) as e:
        xlcfg.parse("x = 1\ny = 09\n", "f.cfg")
    assert str(e.value) == "f.cfg:2:5: invalid octal number 09 (a leading 0 means octal)"


@pytest.mark.parametrize(("text", "value"), [
    (r'x = "a\"b"', 'a"b'), (r"x = 'it''s'", None), (r"x = 'a\'b'", "a'b"),
    (r'x = "tab\there"', "tab\there"), (r'x = "nl\n"', "nl\n"), (r'x = "\x41\102"', "AB"),
    (r'x = "back\\slash"', "back\\slash"), ("x = 'single \"double\" inside'",
                                             'single "double" inside'),
])
def test_strings_in_either_quote_with_backslash_escapes(text: str, value: str | None) -> None:
    if value is None:
        with pytest.raises(ConfigError):
            xlcfg.parse(text)
    else:
        assert xlcfg.parse(text)["x"] == value


def test_lists_nest_span_lines_mix_types_and_allow_a_trailing_comma() -> None:
    cfg = xlcfg.parse('serial = [ "pty", ]\nx = [1, ["a", [2,],\n  "b"],\n  0x10,\n]\n'
                      "empty = []")
    assert cfg["serial"] == ["pty"]
    assert cfg["x"] == [1, ["a", [2], "b"], 16]
    assert cfg["empty"] == []


def test_plus_equals_appends_strings_and_lists_and_a_later_setting_wins() -> None:
    cfg = xlcfg.parse('cmdline = "a"\ncmdline += " b"\nl = [1]\nl += [2, 3]\nm = 1\nm = 2\n'
                      'new += "x"')
    assert cfg["cmdline"] == "a b"
    assert cfg["l"] == [1, 2, 3]
    assert cfg["m"] == 2
    assert cfg["new"] == "x"


def test_plus_equals_on_a_number_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"f\.cfg:2"):
        xlcfg.parse("memory = 1\nmemory += 28\n", "f.cfg")


@pytest.mark.parametrize(("text", "where"), [
    ('name = \n', "c.cfg:1:8: expected a value"),
    ('name = "unterminated\n', "c.cfg:1:8:"),
    ('x = [1, 2\n', "c.cfg:1:5: list is never closed"),
    ('x = 1 2\n', "c.cfg:1:7:"),
    ('= 3\n', "c.cfg:1:1:"),
    ('ok = 1\n  9x = 3\n', "c.cfg:2:3:"),
    ('x = ]\n', "c.cfg:1:5:"),
])
def test_errors_carry_file_line_and_column(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        xlcfg.parse(text, "c.cfg")
    assert str(e.value).startswith(where), str(e.value)


def test_a_file_that_is_not_utf8_is_named_with_the_position(tmp_path: Path) -> None:
    f = tmp_path / "bad.cfg"
    f.write_bytes(b'name = "ok"\nx = "\xff"\n')
    with pytest.raises(ConfigError) as e:
        xlcfg.parse_file(f)
    assert str(e.value) == f"{f}:2:6: file is not valid UTF-8"


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        xlcfg.parse_file(tmp_path / "nope.cfg")


def test_command_line_overrides_take_bare_words_and_keep_their_position() -> None:
    cfg = xlcfg.parse('name = "a"\nmemory = 64\n', "f.cfg")
    cfg.read("name=other", "<command line>", bare_words=True)
    cfg.read("memory=0x80", "<command line>", first_line=2, bare_words=True)
    assert cfg["name"] == "other"
    assert cfg["memory"] == 128
    assert str(cfg.setting("memory").pos) == "<command line>:2:1"


def test_a_failed_read_changes_nothing() -> None:
    cfg = xlcfg.parse('name = "a"\n')
    with pytest.raises(ConfigError):
        cfg.read('name = "b"\nbroken = \n', "more")
    assert cfg["name"] == "a"


def test_deep_nesting_is_refused_not_a_stack_overflow() -> None:
    with pytest.raises(ConfigError, match="deep"):
        xlcfg.parse("x = " + "[" * 10000 + "]" * 10000)


values = st.recursive(
    st.integers(min_value=0, max_value=2**64) | st.text(
        alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))),
    lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_.]{0,10}", fullmatch=True), values,
                       max_size=6))
@settings(max_examples=200)
def test_render_then_parse_gives_the_same_settings(settings_: dict[str, xlcfg.Value]) -> None:
    assert dict(xlcfg.parse(xlcfg.render(settings_))) == settings_


@given(st.text(max_size=200))
@settings(max_examples=500)
def test_any_text_parses_or_fails_with_a_positioned_config_error(text: str) -> None:
    try:
        xlcfg.parse(text, "fuzz.cfg")
    except ConfigError as e:
        assert e.path == "fuzz.cfg"
        assert e.line is not None and e.line >= 1
        assert e.column is not None and e.column >= 1
