"""``mideface-eval --help``: plain text a terminal shows as is, and help on every argument."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

#: reStructuredText that a terminal would print raw: inline literals, roles, interpreted text.
RST_MARKUP = re.compile(r"``|:[a-z]+:`|`[^`\s][^`]*`_?")


@pytest.fixture(scope="module")
def help_text() -> str:
    """The command's --help, from a fresh interpreter (as the installed script prints it)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mideface_nipype.cli.mideface_eval", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return proc.stdout


def argument_entries(text: str) -> dict[str, str]:
    """Each argument of the help's argument sections: its invocation -> its help text.

    argparse prints an entry as its invocation indented by two spaces, then its help two or more
    spaces further on the same line or on the lines below (indented deeper).
    """
    entries: dict[str, str] = {}
    current = None
    in_section = False
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            in_section = line in ("positional arguments:", "options:", "optional arguments:")
            current = None
            continue
        if not in_section or not line.strip():
            continue
        if re.match(r"  \S", line):
            invocation, _, help_part = line.strip().partition("  ")
            current = invocation
            entries[current] = help_part.strip()
        elif current is not None:
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return entries


def test_argument_entries_finds_a_missing_help():
    """The parser of the help text is able to fail: an option without help is reported."""
    text = (
        "usage: x\n\noptions:\n  -h, --help  show this help message and exit\n  --bare\n"
        "  --long-invocation LONG_VALUE_NAME\n                        its help below\n"
    )
    assert argument_entries(text) == {
        "-h, --help": "show this help message and exit",
        "--bare": "",
        "--long-invocation LONG_VALUE_NAME": "its help below",
    }
    assert RST_MARKUP.search("see ``DIR/results.md``")
    assert RST_MARKUP.search("from :func:`metrics.render_views`")
    assert not RST_MARKUP.search("DIR/results.md and 'mideface-nipype[eval]'")


def test_every_argument_has_help(help_text):
    entries = argument_entries(help_text)
    # every option of the command, and the positional heads
    for flag in ("HEAD", "--out DIR", "--methods", "--sources DIR", "--no-tissue"):
        assert any(inv.startswith(flag) for inv in entries), (flag, sorted(entries))
    missing = [inv for inv, text in entries.items() if not text]
    assert not missing, f"arguments without help: {missing}"


def test_no_rst_markup(help_text):
    found = RST_MARKUP.findall(help_text)
    assert not found, f"raw reStructuredText in mideface-eval --help: {found}"
    assert "Needs the eval extra" in help_text
