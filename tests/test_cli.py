"""The ``mideface`` command line: help, version, --check, --demo (bad input and output: see
test_nothing_lost.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import HEADS_DIR

from mideface_nipype import __version__, cli

SAMPLE = HEADS_DIR / "IXI015-HH-1258-T1_ds.nii.gz"


def _run(args, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_help_explains_the_options():
    proc = subprocess.run(
        [sys.executable, "-m", "mideface_nipype.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for option in (
        "--i",
        "--o",
        "--odir",
        "--xmask",
        "--fill-const",
        "--seed",
        "--demo",
        "--check",
    ):
        assert option in proc.stdout
    assert "exclusion mask" in proc.stdout


def test_help_loads_neither_nipype_nor_ants():
    """``--help`` answers at once: the heavy libraries load only when a run needs them."""
    code = (
        "import sys\n"
        "from mideface_nipype import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('nipype', 'ants') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("[]"), proc.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_input_is_an_error(capsys):
    code, err = _run([], capsys)
    assert code == 1 and "--i" in err


def test_demo_defaces_the_bundled_head_and_check_finds_the_code(tmp_path, capsys):
    out = tmp_path / "demo"
    code, _ = _run(["--demo", out], capsys)
    assert code == 0
    assert (out / "defaced.nii.gz").is_file() and (out / "stats.json").is_file()
    code, _ = _run(["--check", out / "defaced.nii.gz", tmp_path / "check.txt"], capsys)
    assert code == 0
    assert (tmp_path / "check.txt").read_text().strip() == "1"
    cli.main(["--check", str(SAMPLE)])
    assert capsys.readouterr().out.strip() == "0"
