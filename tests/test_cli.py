"""The ``mideface`` command line: help, version, --check, --demo, and bad input."""

from __future__ import annotations

import gzip
import subprocess
import sys

import nibabel as nib
import numpy as np
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


def _bad_inputs(tmp_path):
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not an image\n")
    flat = tmp_path / "slice.nii.gz"
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((64, 64)).astype(np.float32), np.eye(4)),
        flat,
    )
    zeros = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 40), np.int16), np.eye(4)), zeros)
    nans = tmp_path / "nans.nii.gz"
    data = np.asarray(nib.load(SAMPLE).dataobj, dtype=np.float32)
    data[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(data, nib.load(SAMPLE).affine), nans)
    truncated = tmp_path / "truncated.nii.gz"
    raw = gzip.decompress(SAMPLE.read_bytes())
    truncated.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(SAMPLE.read_bytes()[:4000])
    nohead = tmp_path / "nohead.nii.gz"
    speck = np.zeros((64, 64, 64), np.uint8)
    speck[5:7, 5:7, 5:7] = 200
    nib.save(nib.Nifti1Image(speck, np.eye(4)), nohead)
    return {
        "missing": (tmp_path / "absent.nii.gz", "file not found"),
        "text": (text, "cannot be read"),
        "2-D": (flat, "2-D"),
        "zeros": (zeros, "empty"),
        "NaN": (nans, "NaN"),
        "truncated": (truncated, "truncated or corrupt"),
        "corrupt gzip": (corrupt, "corrupt"),
        "no head": (nohead, "no head"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "text", "2-D", "zeros", "NaN", "truncated", "corrupt gzip", "no head"]
)
def test_bad_input_clear_error_and_no_output(tmp_path, capsys, case):
    path, expected = _bad_inputs(tmp_path)[case]
    out_dir = tmp_path / "out"
    code, err = _run(["--i", path, "--o", out_dir / "defaced.nii.gz"], capsys)
    assert code == 1
    assert str(path) in err and expected in err, err
    assert len(err.strip().splitlines()) <= 3  # a clear message, not a traceback
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    copy = tmp_path / "head.nii.gz"
    copy.write_bytes(SAMPLE.read_bytes())
    before = copy.read_bytes()
    code, err = _run(["--i", copy, "--o", copy], capsys)
    assert code == 1 and "overwrite the input" in err
    assert copy.read_bytes() == before
