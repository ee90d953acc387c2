"""Whatever the terminal shows that came from a file or a peer is escaped (issue #23).

A base name, tensor name, ref-log message or a remote's error can hold an OSC/CSI
escape sequence or rich markup; patchctl prints them as visible escapes and
literal text, never as terminal controls or styles.
"""

from __future__ import annotations

import json

import pytest

from patchctl.cli._common import Column, render_table, safe

HOSTILE = "evil\x1b]0;pwned\x07\x1b[31m[bold]loud[/]\u202e"


@pytest.mark.parametrize(("text", "want"), [
    ("plain name", "plain name"),
    ("a\x1b[2Jb", "a\\x1b[2Jb"),
    ("osc\x1b]8;;http://x\x07", "osc\\x1b]8;;http://x\\x07"),
    ("c1\x9bm", "c1\\x9bm"),
    ("bidi\u202eexe.txt", "bidi\\u202eexe.txt"),
    ("two\nlines", "two\\x0alines"),
    ("tab\there", "tab\there"),
    ("ünïcode ok", "ünïcode ok"),
])
def test_safe_escapes_control_characters(text, want):
    assert safe(text) == want
    assert "\x1b" not in safe(text) and "\x07" not in safe(text)


def test_tables_escape_every_cell():
    out = render_table([Column("NAME"), Column("BASE")], [["x:v1", HOSTILE]], 200, title=HOSTILE)
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "[bold]loud[/]" in out and "\\x1b]0;pwned\\x07" in out


def test_hostile_strings_from_a_manifest_and_a_log_are_escaped(cli, models):
    r = cli("push", str(models.finetune), "x:v1", "--base", str(models.base), "--base-name", HOSTILE,
            "-m", "msg " + HOSTILE)
    assert r.code == 0, r.err
    assert json.loads(cli("show", "x:v1", "--json").out)["base"]["name"] == HOSTILE  # stored as given
    for args in (("ls",), ("ls", "--wide"), ("show", "x:v1"), ("show", "x:v1", "--tensors"), ("log", "x:v1")):
        r = cli(*args)
        assert r.code == 0, (args, r.err)
        shown = r.out + r.err
        assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown, args
        assert "\\x1b" in shown, args  # visible, not hidden
    r = cli("show", "x:v1")
    assert "[bold]loud[/]" in r.out  # markup stays literal text


def test_errors_quoting_input_are_escaped(cli):
    r = cli("show", "no\x1b]0;x\x07such:v1")
    assert r.code != 0 and "\x1b" not in r.err and "\x07" not in r.err and "\\x1b" in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_rich_output_prints_markup_literally(cli, models):
    """The rich console (merge, port, pull, eval output) parses no markup and escapes controls."""
    from patchctl.cli import _common

    with _common.console.capture() as cap:
        _common.console.print(f"merged {HOSTILE}")
    text = cap.get()
    assert "[bold]loud[/]" in text and "\x1b]0;" not in text and "\\x1b]0;pwned" in text
