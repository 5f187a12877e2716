"""The error hierarchy (``utils.errors``): one line per error, and that line still reaches the
command line when the error is raised inside a Nipype node (in this process or another)."""

from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mideface_nipype.cli.common import error_line
from mideface_nipype.engine import headmask, register
from mideface_nipype.utils import errors, io
from mideface_nipype.utils.errors import (
    InputError,
    MidefaceError,
    NoHeadError,
    OutputError,
    RegistrationError,
)


def test_an_error_is_one_line_naming_its_file():
    err = InputError("file not found", path=Path("/data/T1w.nii.gz"))
    assert str(err) == "/data/T1w.nii.gz: file not found"
    assert (err.path, err.problem) == ("/data/T1w.nii.gz", "file not found")
    assert str(RegistrationError("pose ratio 0.10 < 1.2")) == "pose ratio 0.10 < 1.2"
    assert RegistrationError("pose ratio 0.10 < 1.2").path is None


def test_kinds_keep_the_builtin_bases_callers_catch():
    """``except ValueError``/``except InputError`` keep catching what they caught before the
    hierarchy; every kind is defined once and is the one the modules raise."""
    assert issubclass(OutputError, InputError) and issubclass(InputError, ValueError)
    assert issubclass(NoHeadError, ValueError) and issubclass(RegistrationError, RuntimeError)
    for kind in (InputError, OutputError, NoHeadError, RegistrationError):
        assert issubclass(kind, MidefaceError)
    assert (io.InputError, io.OutputError) == (InputError, OutputError)
    assert headmask.NoHeadError is NoHeadError and register.RegistrationError is RegistrationError


def test_an_error_survives_pickling_with_one_note():
    err = OutputError("already exists; give --force to overwrite it", path="out.nii.gz")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is OutputError and str(back) == str(err) and back.path == "out.nii.gz"
    assert back.__notes__ == err.__notes__ and len(back.__notes__) == 1


def test_a_foreign_error_is_its_last_line():
    full_disk = OSError(28, "No space left on device")
    assert error_line(full_disk) == "[Errno 28] No space left on device"
    crash = RuntimeError("Traceback ...\n  File x\nValueError: bad\n")
    assert error_line(crash) == "ValueError: bad"
    assert errors.carried_error(RuntimeError("no note here")) is None


def _no_head(path: Path) -> Path:
    """A volume with a speck of signal and no head."""
    speck = np.zeros((64, 64, 64), np.uint8)
    speck[5:7, 5:7, 5:7] = 200
    nib.save(nib.Nifti1Image(speck, np.eye(4)), path)
    return path


@pytest.mark.parametrize("plugin", ["Linear", "MultiProc"])
def test_a_node_error_reaches_the_command_as_its_line(tmp_path, plugin):
    """A ``NoHeadError`` raised in the HeadMask step, in this process (Linear) or a worker
    (MultiProc): the error the plugin raises, and Nipype's crash file, give back its path and
    problem without the name of its class."""
    from nipype.pipeline import engine as pe

    from mideface_nipype.interfaces import HeadMask

    nohead = _no_head(tmp_path / "nohead.nii.gz")
    workflow = pe.Workflow(name="wf", base_dir=str(tmp_path / "work"))
    workflow.add_nodes([pe.Node(HeadMask(in_file=str(nohead)), name="head_mask")])
    crash_dir = tmp_path / "crash"
    workflow.config["execution"] = {"crashdump_dir": str(crash_dir), "crashfile_format": "txt"}
    with pytest.raises(Exception) as caught:
        workflow.run(plugin=plugin, plugin_args={"n_procs": 2} if plugin == "MultiProc" else {})
    assert not isinstance(caught.value, MidefaceError)  # only Nipype's text crossed
    found = errors.carried_error(caught.value)
    assert found is not None and found.path == str(nohead)
    line = error_line(caught.value)
    assert line.startswith(f"{nohead}: no head found in the image") and "Error" not in line
    (crash,) = crash_dir.glob("crash-*.txt")
    assert str(errors.error_from_text(crash.read_text())) == line
