"""Nothing lost: no ``mideface`` run destroys an input, leaves half its outputs or lies about why.

Every write goes through ``io.Publisher``: never onto a file the run reads (by path or inode), a
temp name + fsync + rename, the umask's mode, all of ``--odir`` at once, everything removed when
the run fails. Inputs and options are checked before any work. One real run (a scaled uint8 IXI
head to MGZ) is shared by the tests that need outputs; while it runs, two more runs on its work
folder and output folder are refused at once. The bad-input and bad-output corpora (once split
between test_cli.py and test_robustness.py) are one table each here.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import HEADS_DIR

from mideface_nipype.cli import common
from mideface_nipype.cli import mideface as cli
from mideface_nipype.cli import mideface_eval as eval_cli
from mideface_nipype.engine import fill, register
from mideface_nipype.utils import io
from mideface_nipype.utils.geometry import GridImage
from mideface_nipype.workflows import base, outputs

#: The real 2 mm head (IXI, uint8 with scl_slope, BIDS-named in the copies).
HEAD = HEADS_DIR / "IXI015-HH-1258-T1_ds.nii.gz"
#: What the shared run writes into its --odir (--mgz, --no-samseg, BIDS-named input).
ODIR_NAMES = {
    "defaced.mgz",
    "defaced.json",
    "face.mask.mgz",
    "head.mask.mgz",
    "exclusion.mask.mgz",
    "subject_to_atlas.txt",
    "subject_to_atlas.mat",
    "template.surf.gii",
    "distances.json",
    "stats.json",
    "report.html",
    "log",
    "log/mideface.log",
}
#: A contender must be refused well within the shared run's ~25 s.
REFUSAL_S = 15.0


def md5(path: Path) -> str | None:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else None


def state(path: Path) -> tuple[str | None, int | None]:
    """An input's md5 and mode, which no run may change."""
    return md5(path), (path.stat().st_mode if path.is_file() else None)


def tree(folder: Path) -> set[str]:
    """Every path under ``folder`` (hidden ones too), relative, or empty if it is absent."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def error_line(err: str, *expected: str) -> str:
    """The run printed exactly one error line, no traceback, holding every ``expected``."""
    errors = [line for line in err.splitlines() if line.startswith("mideface: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for word in expected:
        assert word in errors[0], errors[0]
    return errors[0]


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    """``mideface`` in-process: (exit code, stdout, stderr); argparse refusals included."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(argv: list, capsys, inputs: list[Path], *expected: str, elapsed_s: float = 10.0):
    """Exit 1 with one line naming the problem, quickly, every input's bytes unchanged."""
    before = {p: state(p) for p in inputs}
    start = time.perf_counter()
    code, _, err = run_cli(argv, capsys)
    assert time.perf_counter() - start < elapsed_s
    assert code == 1, err
    assert {p: state(p) for p in inputs} == before
    return error_line(err, *expected)


@pytest.fixture
def no_engine(monkeypatch):
    """Refusals must come before the workflow starts."""

    def engine(*_, **__):
        raise AssertionError("the workflow ran")

    monkeypatch.setattr(base, "run_workflow", engine)


@pytest.fixture
def head(tmp_path) -> Path:
    path = tmp_path / "in" / "sub-01_T1w.nii.gz"
    path.parent.mkdir()
    shutil.copyfile(HEAD, path)
    return path


def umask_run(argv: list, mask: int, **kwargs) -> subprocess.Popen:
    """``mideface`` in a subprocess under ``umask mask``."""
    cmd = [sys.executable, "-m", "mideface_nipype.cli.mideface", *map(str, argv)]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.umask(mask),
        **kwargs,
    )


def _wait_for(paths: list[Path], proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never took its locks"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory) -> dict:
    """One real run (umask 002) of a scaled uint8 BIDS-named head into --odir --mgz; while it
    holds its locks, a run on the same --odir and one on the same --work-dir are started."""
    root = tmp_path_factory.mktemp("shared")
    src = root / "in" / "sub-01_T1w.nii.gz"
    src.parent.mkdir()
    shutil.copyfile(HEAD, src)
    sidecar = src.with_name("sub-01_T1w.json")
    sidecar.write_text('{"RepetitionTime": 2.3}\n')
    inputs = [src, sidecar]
    before = {p: md5(p) for p in inputs}
    od, wd = root / "od", root / "wd"
    argv = ["--i", src, "--odir", od, "--mgz", "--no-samseg", "--work-dir", wd]
    first = umask_run(argv, 0o002)
    _wait_for([root / ".od.lock", root / ".wd.lock"], first)
    start = time.perf_counter()
    procs = {
        name: umask_run(extra, 0o002)
        for name, extra in {
            "same odir": ["--i", src, "--odir", od, "--no-samseg", "--work-dir", root / "wd2"],
            "same work dir": ["--i", src, "--odir", root / "od2", "--no-samseg", "--work-dir", wd],
        }.items()
    }
    contenders = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        contenders[name] = (proc.returncode, err, time.perf_counter() - start, first.poll())
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    return {
        "root": root,
        "src": src,
        "od": od,
        "inputs": inputs,
        "before": before,
        "contenders": contenders,
        "stderr": err,
    }


# ----------------------------------------------------------------------------- the shared run


@pytest.mark.slow
def test_inputs_unchanged_and_odir_complete(shared_run):
    assert {p: md5(p) for p in shared_run["inputs"]} == shared_run["before"]
    assert tree(shared_run["od"]) == ODIR_NAMES  # no staging folder, temp or lock file left
    root = shared_run["root"]
    assert not list(root.glob(".*lock")) and not (root / "od2").exists()


@pytest.mark.slow
def test_outputs_get_the_umask_mode(shared_run, tmp_path, capsys):
    od = shared_run["od"]
    for name in ODIR_NAMES - {"log"}:
        assert (od / name).stat().st_mode & 0o777 == 0o664, name
    # the same under umask 022, for --check OUTFILE and --apply (and its BIDS sidecar)
    src = shared_run["src"]
    check = tmp_path / "check.txt"
    proc = umask_run(["--check", od / "defaced.mgz", check], 0o022)
    assert proc.communicate()[0].strip() == "1" and proc.returncode == 0
    applied = tmp_path / "sub-01_T1w.nii.gz"
    argv = ["--apply", src, od / "face.mask.mgz", "regheader", applied]
    proc = umask_run(argv, 0o022)
    assert proc.wait() == 0, proc.communicate()
    for path in (check, applied, tmp_path / "sub-01_T1w.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert {p: md5(p) for p in shared_run["inputs"]} == shared_run["before"]


@pytest.mark.slow
def test_mgz_of_a_scaled_nifti_keeps_the_code_and_the_values(shared_run, capsys):
    od = shared_run["od"]
    code, out, _ = run_cli(["--check", od / "defaced.mgz"], capsys)
    assert code == 0 and out.strip() == "1"
    src = nib.load(shared_run["src"])
    assert src.dataobj.slope != 1.0 and src.get_data_dtype() == np.uint8
    defaced = nib.load(od / "defaced.mgz")
    assert defaced.get_data_dtype().name == "float32"  # real values: MGH stores no slope
    untouched = np.asarray(nib.load(od / "face.mask.mgz").dataobj) == 0
    real = np.asarray(src.dataobj, dtype=np.float32)
    kept = np.isclose(np.asarray(defaced.dataobj), real, rtol=1e-6)[untouched]
    assert np.count_nonzero(~kept) <= len(fill.CODE_TAG)  # only the code voxels differ
    sidecar = (od / "defaced.json").read_text()
    assert "RepetitionTime" in sidecar and "Defacing" in sidecar


@pytest.mark.slow
def test_mgz_of_float64_values_is_warned_and_nifti_keeps_them(shared_run, tmp_path, capsys):
    """MGH holds no float64: an ``.mgz`` output changes untouched voxels, so the run says so
    (naming the output, the count and the cure); a NIfTI output keeps them bit for bit."""
    src = nib.load(shared_run["src"])
    values = np.asarray(src.dataobj, dtype=np.float64) + 1e-9  # fractions float32 cannot hold
    f64 = tmp_path / "f64.nii.gz"
    nib.save(nib.Nifti1Image(values, src.affine), f64)
    inexact = int(np.count_nonzero(values.astype(np.float32) != values))
    mask = shared_run["od"] / "face.mask.mgz"
    untouched = np.asarray(nib.load(mask).dataobj) == 0
    untouched[: len(fill.CODE_TAG), 0, 0] = False  # the provenance code
    for name, warned in (("out.mgz", True), ("out.nii.gz", False)):
        out = tmp_path / name
        code, _, err = run_cli(["--apply", f64, mask, "regheader", out], capsys)
        assert code == 0, err
        warnings = [line for line in err.splitlines() if "warning:" in line]
        kept = np.asarray(nib.load(out).dataobj)[untouched] == values[untouched]
        if warned:
            assert len(warnings) == 1 and f"{out}: MGH stores no float64" in warnings[0]
            assert f"{inexact} voxels of {f64}" in warnings[0] and ".nii.gz" in warnings[0]
            assert not kept.all()
        else:
            assert warnings == [] and kept.all()


@pytest.mark.parametrize(
    ("dtype", "slope", "changed"),
    [
        ("float64", 1.0, True),
        ("float32", 1.0, False),
        ("uint16", 1.0, False),
        ("uint8", 0.7, False),
        ("int64", 1.0, False),
    ],
)
def test_mgh_rounding_counts_the_values_mgh_cannot_hold(dtype, slope, changed):
    """float64 fractions are rounded to float32; uint16 and small int64 fit int32; scaled data
    are stored as their float32 real values (what the README promises), not rounded again."""
    data = np.arange(4 * 5 * 6).reshape(4, 5, 6) * (1.1 if dtype.startswith("float") else 1)
    img = nib.Nifti1Image(data.astype(dtype), np.eye(4), dtype=dtype)
    img.header.set_slope_inter(slope, 0.0)
    n_voxels, from_dtype, to_dtype = io.mgh_rounding(img)
    assert (n_voxels > 0) == changed
    if changed:
        assert (from_dtype, to_dtype) == (np.dtype("float64"), np.dtype("float32"))


@pytest.mark.slow
def test_log_and_messages_of_the_run(shared_run):
    log = (shared_run["od"] / "log" / "mideface.log").read_text()
    assert "done in" in log and "error" not in log


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "words"),
    [("same odir", ["output folder", "od"]), ("same work dir", ["work folder", "wd"])],
)
def test_a_second_run_on_the_same_folder_is_refused_at_once(shared_run, case, words):
    code, err, elapsed_s, first_state = shared_run["contenders"][case]
    assert first_state is None  # the first run was still working when this one ended
    assert code == 1 and elapsed_s < REFUSAL_S
    error_line(err, "another mideface run", *words)


# ----------------------------------------------------------------------------- outputs onto inputs


def _links(head: Path, folder: Path, name: str) -> dict[str, Path]:
    """``folder/name`` as a symlink to and as a hard link of ``head``."""
    folder.mkdir(parents=True, exist_ok=True)
    sym, hard = folder / f"sym-{name}", folder / f"hard-{name}"
    sym.symlink_to(head)
    os.link(head, hard)
    return {"symlink": sym, "hard link": hard}


def test_input_inside_odir_with_an_output_name_is_refused(tmp_path, capsys, no_engine):
    od = tmp_path / "od"
    od.mkdir()
    head = od / "face.mask.nii.gz"
    shutil.copyfile(HEAD, head)
    refused(["--i", head, "--odir", od], capsys, [head], str(head), "overwrite the input")
    assert tree(od) == {"face.mask.nii.gz"}


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_odir_output_linked_to_the_input_is_refused(tmp_path, capsys, head, link, no_engine):
    od = tmp_path / "od"
    od.mkdir()
    if link == "symlink":
        (od / "face.mask.nii.gz").symlink_to(head)
    else:
        os.link(head, od / "face.mask.nii.gz")
    refused(["--i", head, "--odir", od], capsys, [head], "face.mask.nii.gz", "overwrite the input")
    assert tree(od) == {"face.mask.nii.gz"}


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_o_linked_to_the_input_is_refused(tmp_path, capsys, head, link, no_engine):
    out = _links(head, tmp_path / "out", "defaced.nii.gz")[link]
    refused(["--i", head, "--o", out], capsys, [head], str(out), "overwrite the input")


def test_check_onto_its_volume_is_refused(tmp_path, capsys, head):
    refused(["--check", head, head], capsys, [head], str(head), "not a volume")
    for path in _links(head, tmp_path / "links", "result").values():
        refused(["--check", head, path], capsys, [head], str(path), "overwrite the input")
    refused(["--check", head, tmp_path / "a.txt", tmp_path / "b.txt"], capsys, [head], "--check")
    assert not (tmp_path / "a.txt").exists()


def test_the_other_file_of_a_pair_is_an_input_too(tmp_path, capsys, head, no_engine):
    """``--check head.hdr head.img --force`` wrote "0" over the pair's voxel data, exit 0."""
    pair = tmp_path / "pair" / "head.hdr"
    pair.parent.mkdir()
    nib.save(nib.Nifti1Pair(np.asarray(nib.load(head).dataobj), nib.load(head).affine), pair)
    partner = pair.with_suffix(".img")
    for vol, out in ((pair, partner), (partner, pair)):
        refused(["--check", vol, out, "--force"], capsys, [pair, partner], str(out), "overwrite")
        argv = ["--i", vol, "--o", tmp_path / "o.nii.gz", "--log", out]
        refused(argv, capsys, [pair, partner], str(out))
        argv = ["--i", vol, "--o", tmp_path / "o.nii.gz", "--apply-to", out]
        refused(argv, capsys, [pair, partner], str(out), "same image as")


def test_check_writes_its_file_once(tmp_path, capsys, head):
    result = tmp_path / "check.txt"
    code, out, _ = run_cli(["--check", head, result], capsys)
    assert code == 0 and out.strip() == "0" and result.read_text() == "0\n"
    refused(["--check", head, result], capsys, [head, result], str(result), "--force")
    code, _, _ = run_cli(["--check", head, result, "--force"], capsys)
    assert code == 0


def test_apply_onto_its_face_mask_is_refused(tmp_path, capsys, head):
    mask = tmp_path / "face.mask.nii.gz"
    img = nib.load(head)
    block = np.zeros(img.shape[:3], np.uint8)
    block[:20] = 1
    nib.save(io.mask_image(block, img), mask)
    ins = [head, mask]
    argv = ["--apply", head, mask, "regheader"]
    refused([*argv, mask], capsys, ins, str(mask), "overwrite the input")
    for path in _links(mask, tmp_path / "links", "fm.nii.gz").values():
        refused([*argv, path], capsys, ins, str(path), "overwrite the input")
    refused([*argv, head], capsys, ins, str(head), "overwrite the input")
    refused([*argv, tmp_path / "x.txt"], capsys, ins, "x.txt", "unknown volume format")
    assert tree(tmp_path / "links") == {"sym-fm.nii.gz", "hard-fm.nii.gz"}


def test_existing_outputs_need_force(tmp_path, capsys, head, no_engine):
    od = tmp_path / "od"
    od.mkdir()
    old = od / "stats.json"
    old.write_text("{}\n")
    refused(["--i", head, "--odir", od], capsys, [head, old], str(old), "--force")
    assert tree(od) == {"stats.json"}


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("option", "value"),
    [("--seed", "-1"), ("--threads", "0"), ("--statframe", "-1"), ("--max-gb", "0")],
)
def test_option_out_of_range_is_refused_by_argparse(tmp_path, capsys, head, option, value):
    code, _, err = run_cli(["--i", head, "--odir", tmp_path / "od", option, value], capsys)
    assert code == 1 and f"argument {option}" in err and "out of range" in err
    assert not (tmp_path / "od").exists()


@pytest.mark.parametrize("odir", [False, True])
def test_o_with_an_unknown_suffix_is_refused_before_the_run(
    tmp_path, capsys, head, odir, no_engine
):
    out = tmp_path / "x.txt"
    extra = ["--odir", tmp_path / "od"] if odir else []
    refused(["--i", head, "--o", out, *extra], capsys, [head], str(out), "unknown volume format")
    assert tree(tmp_path) == {"in", "in/sub-01_T1w.nii.gz"}


def test_bad_companion_files_are_refused_before_the_run(tmp_path, capsys, head, no_engine):
    od = tmp_path / "od"
    matrix = tmp_path / "init.txt"
    matrix.write_text("1 0 0\n0 1 0\n0 0 1\n")
    refused(["--i", head, "--odir", od, "--init-reg", matrix], capsys, [head], "init.txt", "4x4")
    np.savetxt(matrix, np.zeros((4, 4)))
    refused(["--i", head, "--odir", od, "--init-reg", matrix], capsys, [head], "invertible")
    xmask = tmp_path / "xmask.nii.gz"
    nib.save(io.mask_image(np.arange(30**3).reshape(30, 30, 30) % 2, nib.load(head)), xmask)
    refused(["--i", head, "--odir", od, "--xmask", xmask], capsys, [head], "xmask", "grid")
    other = tmp_path / "T2w.nii.gz"
    other.write_text("not a volume")
    argv = ["--i", head, "--odir", od, "--apply-to", other]
    refused(argv, capsys, [head], str(other), "cannot be read")
    refused(["--i", head, "--odir", od, "--statframe", "3"], capsys, [head], "--statframe 3")
    assert not od.exists()


def test_the_input_again_as_another_contrast_is_refused(tmp_path, capsys, head, no_engine):
    """``--apply-to`` the ``--i`` image (by its path, a link, or another spelling of the path)
    or one contrast twice: refused naming it, before any work (it was defaced twice, the second
    time through a registration to itself)."""
    od = tmp_path / "od"
    spelled = head.parent / ".." / head.parent.name / head.name
    for again in (head, spelled, *_links(head, tmp_path / "links", "T2w.nii.gz").values()):
        argv = ["--i", head, "--odir", od, "--apply-to", again]
        refused(argv, capsys, [head], str(again), "same image as")
    other = tmp_path / "T2w.nii.gz"
    shutil.copyfile(head, other)
    argv = ["--i", head, "--odir", od, "--apply-to", other, other]
    refused(argv, capsys, [head, other], str(other), "same image as")
    assert not od.exists()


def test_a_log_that_could_damage_data_is_refused(tmp_path, capsys, head, no_engine):
    """``--log`` onto the input (a link of it too), onto another output, onto a volume name or
    onto an existing file that is not text (a DICOM has no suffix): refused naming it, before
    any work, every file's bytes unchanged (the log was appended to a scan it was not given,
    and ``--apply`` wrote it over its own input)."""
    od, out = tmp_path / "od", tmp_path / "out.nii.gz"
    scan = tmp_path / "IM0001"
    scan.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)))
    other = tmp_path / "T2w.nii.gz"
    shutil.copyfile(head, other)
    links = _links(head, tmp_path / "links", "log.txt")
    files = [head, other, scan]
    cases = {
        links["symlink"]: "overwrite the input",
        links["hard link"]: "overwrite the input",
        od / "stats.json": "two outputs",
        other: "not a volume",
        scan: "not a text file",
    }
    for log, why in cases.items():
        refused(["--i", head, "--odir", od, "--log", log], capsys, files, str(log), why)
        apply = ["--apply", head, other, "regheader", out, "--log", log]
        if log.parent != od:
            refused(apply, capsys, files, str(log), why)
    assert not od.exists() and not out.exists()
    text = tmp_path / "earlier.log"
    text.write_text("06:14:09 mideface: an earlier run\n")
    assert common.check_log_file(text, io.Publisher([head]), [out]) == text


def test_a_work_folder_inside_the_odir_is_refused(tmp_path, capsys, head, no_engine):
    """Nipype's folders would be published with the outputs (and the same folder was reported
    as "another mideface run is using this output folder")."""
    od = tmp_path / "od"
    for work in (od, od / "work"):
        argv = ["--i", head, "--odir", od, "--work-dir", work]
        line = refused(argv, capsys, [head], f"{work}: the work folder is inside the output folder")
        assert line == (  # the work folder alone is named (not the input before it)
            f"mideface: error: {work}: the work folder is inside the output folder {od}; "
            "give --work-dir outside it"
        )
    assert not od.exists()


# ----------------------------------------------------------------------------- failing runs


def _sink_only(shared_run, before=lambda: None):
    """``run_workflow`` running only the graph's sink (``outputs_wf``, the one the command
    built), on the shared run's files as the engine's outputs; ``before()`` first."""
    od, run_workflow = shared_run["od"], base.run_workflow
    engine = {key: str(od / name.format(s=".mgz")) for name, key in outputs.ODIR_FILES.items()}
    engine["out_file"] = str(od / "defaced.mgz")

    def run(workflow, work_dir, *, n_procs=1):
        before()
        sink = workflow.get_node("outputs_wf")
        for field in sink.get_node("publish").inputs.destinations:
            setattr(sink.inputs.inputnode, field, engine[field])
        return run_workflow(sink, work_dir, n_procs=n_procs)

    return run


@pytest.mark.slow
@pytest.mark.parametrize("fails", ["third copy", "second move into odir"])
def test_failure_while_publishing_leaves_no_output(
    shared_run, tmp_path, capsys, monkeypatch, head, fails
):
    """A full disk part-way through publishing (by the graph's sink): nothing under a final
    name, the log keeps the error."""
    monkeypatch.setattr(base, "run_workflow", _sink_only(shared_run))
    calls = []
    if fails == "third copy":
        real = io.shutil.copyfile

        def copyfile(src, dst, *args, **kwargs):
            calls.append(dst)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(io.shutil, "copyfile", copyfile)
    else:
        real = os.replace

        def replace(src, dst):
            if ".mideface-staging." in str(src) and ".mideface-staging." not in str(dst):
                calls.append(dst)
                if len(calls) == 2:
                    raise OSError(28, "No space left on device")
            return real(src, dst)

        monkeypatch.setattr(io.os, "replace", replace)
    od, out = tmp_path / "od", tmp_path / "out"
    argv = ["--i", head, "--odir", od, "--mgz", "--o", out / "d.mgz", "--facemask", out / "f.mgz"]
    argv.append("--no-samseg")
    line = refused(argv, capsys, [head], "No space left on device")
    assert len(calls) >= 2
    assert tree(od) == {"log", "log/mideface.log"} and tree(out) == set()
    assert line.removeprefix("mideface: error: ") in (od / "log" / "mideface.log").read_text()
    # the same run publishes everything when the disk has room
    monkeypatch.undo()
    monkeypatch.setattr(base, "run_workflow", _sink_only(shared_run))
    assert run_cli(argv, capsys)[0] == 0
    assert tree(out) == {"d.mgz", "f.mgz", "d.json"}
    assert {"face.mask.mgz", "stats.json", "report.html"} <= tree(od)


def test_failed_engine_run_keeps_its_error_in_the_log(tmp_path, capsys):
    speck = np.zeros((64, 64, 64), np.uint8)
    speck[5:7, 5:7, 5:7] = 200
    nohead = tmp_path / "nohead.nii.gz"
    nib.save(nib.Nifti1Image(speck, np.eye(4)), nohead)
    od = tmp_path / "od"
    line = refused(["--i", nohead, "--odir", od, "--no-samseg"], capsys, [nohead], "no head")
    assert tree(od) == {"log", "log/mideface.log"}
    assert line.removeprefix("mideface: error: ") in (od / "log" / "mideface.log").read_text()


def test_registration_refusals_say_what_was_seen_and_what_to_try():
    """Head masks that do not meet, and a pose no better than turned ones (unrelated noise)."""
    rng = np.random.default_rng(0)
    grid = np.zeros((24, 24, 24), bool)
    grid[4:20, 4:20, 4:20] = True
    image = rng.random(grid.shape).astype(np.float32)
    head = GridImage(image, np.eye(4), grid)
    shifted = np.eye(4)
    shifted[0, 3] = 30.0
    with pytest.raises(register.RegistrationError) as dice:
        register.check_registration(head, head, shifted)
    with pytest.raises(register.RegistrationError) as pose:
        noise = rng.random(grid.shape).astype(np.float32)
        register.check_registration(head, GridImage(noise, np.eye(4), grid), np.eye(4))
    for err, seen in ((dice, "Dice 0.00"), (pose, "pose ratio")):
        message = str(err.value)
        assert seen in message and "nothing was defaced" in message
        assert "--init-reg" in message and "--no-samseg" in message and "contrast" in message
        assert "wrong way" not in message and "\n" not in message
    assert "no better than axis-turned copies" in str(pose.value)  # noise: nothing fits
    # another contrast's coregistration (--apply-to) names the reference head and does not
    # suggest the atlas registration's options, which do not reach it
    with pytest.raises(register.RegistrationError) as coreg:
        register.check_registration(
            head, GridImage(noise, np.eye(4), grid), np.eye(4), refusal=register.COREG_REFUSAL
        )
    message = str(coreg.value)
    assert "the reference head, registered, fits this image no better" in message
    assert "face mask cannot be carried" in message and "same person" in message
    assert "--init-reg" not in message and "atlas" not in message


# ----------------------------------------------------------------------------- bad inputs


def _save_with_affine(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Save with any sform, even one nibabel cannot decompose into a qform (degenerate, NaN)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_qform(None, code=0)
    header.set_sform(affine, code=1)
    nib.save(nib.Nifti1Image(data, None, header), path)
    return path


def _huge_header(path: Path, n: int) -> Path:
    """A gzip NIfTI whose header claims ``n``^3 uint8 voxels but holds 1 MB of them."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((n, n, n))
    affine = np.eye(4)
    affine[:3, 3] = -(n - 1) / 2.0
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header.set_data_offset(352)
    raw = header.binaryblock + b"\0" * 4 + bytes(1 << 20)
    path.write_bytes(gzip.compress(raw))
    return path


def _bad_input(tmp_path: Path, case: str) -> tuple[Path, str]:
    """Write the bad input of ``case``; return its path and a word the error must contain."""
    img = nib.load(HEAD)
    real = io.first_frame(img)
    raw = gzip.decompress(HEAD.read_bytes())
    path = tmp_path / f"{case}.nii.gz"
    if case == "missing":
        return path, "file not found"
    if case == "empty file":
        path.write_bytes(b"")
        return path, "cannot be read"
    if case == "text":
        path.write_text("subject 01, T1w, see notes\n")
        return path, "cannot be read"
    if case == "corrupt gzip":  # bytes flipped inside the stream: only its CRC tells
        data = bytearray(HEAD.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xA5 for b in data[middle : middle + 64])
        path.write_bytes(bytes(data))
        return path, "corrupt"
    if case == "cut gzip":
        path.write_bytes(HEAD.read_bytes()[:50_000])
        return path, "truncated"
    if case == "gzip of 4000 bytes":
        path.write_bytes(HEAD.read_bytes()[:4000])
        return path, "corrupt"
    if case == "half the data, gzipped":
        path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
        return path, "truncated or corrupt"
    if case == "truncated":
        path = tmp_path / "truncated.nii"
        path.write_bytes(raw[: len(raw) // 3])
        return path, "truncated"
    if case == "header only":
        path = tmp_path / "header_only.nii"
        path.write_bytes(raw[:348])
        return path, "truncated"
    if case == "2-D":
        nib.save(nib.Nifti1Image(real[:, :, 40], img.affine), path)
        return path, "2-D"
    if case == "zeros":
        nib.save(nib.Nifti1Image(np.zeros((40, 40, 40), np.int16), np.eye(4)), path)
        return path, "same value"
    if case == "constant":
        nib.save(nib.Nifti1Image(np.full((40, 40, 40), 700.0, np.float32), img.affine), path)
        return path, "same value"
    if case in ("NaN", "+Inf", "-Inf"):
        real[60, 60, 45] = {"NaN": np.nan, "+Inf": np.inf, "-Inf": -np.inf}[case]
        nib.save(nib.Nifti1Image(real, img.affine), path)
        return path, "NaN or infinite"
    if case == "no head":
        speck = np.zeros((64, 64, 64), np.uint8)
        speck[5:7, 5:7, 5:7] = 200
        nib.save(nib.Nifti1Image(speck, img.affine), path)
        return path, "no head"
    if case in ("header claims 1600^3", "header claims 20000^3"):
        return _huge_header(path, 1600 if "1600" in case else 20000), "--max-gb"
    if case == "scl_slope 1e36 on int16":  # nibabel would reset the slope: write the bytes
        stored = np.asarray(img.dataobj.get_unscaled()).astype(np.int16) * 100
        header = nib.Nifti1Header()
        header.set_data_dtype(np.int16)
        header.set_data_shape(stored.shape)
        header.set_sform(img.affine, code=1)
        header.set_data_offset(352)
        header["scl_slope"], header["scl_inter"] = 1e36, 0.0
        body = header.binaryblock + b"\0" * 4 + stored.tobytes(order="F")
        path.write_bytes(gzip.compress(body))
        return path, "overflows float32"
    if case in ("pixdim 0, qform", "pixdim 0, no qform or sform"):  # nibabel would read 1 mm
        header = img.header.copy()
        with_qform = case == "pixdim 0, qform"
        header.set_sform(None, code=0)
        header.set_qform(img.affine if with_qform else None, code=int(with_qform))
        zeroed = nib.Nifti1Image(real, None, header)
        zeroed.header["pixdim"][1:4] = 0.0  # after the image's own header check
        nib.save(zeroed, path)
        return path, "no voxel size"
    affine = img.affine.copy()
    if case == "degenerate affine":
        affine[:3, 0] = 0.0
        return _save_with_affine(real, affine, path), "unusable"
    if case == "NaN affine":
        affine[0, 3] = np.nan
        return _save_with_affine(real, affine, path), "unusable"
    if case == "km voxels":
        affine[:3, :3] *= 1000.0
        return _save_with_affine(real, affine, path), "absurd affine"
    if case == "far away":
        affine[:3, 3] += 1e12
        return _save_with_affine(real, affine, path), "absurd affine"
    raise KeyError(case)


BAD_INPUTS = [
    "missing",
    "empty file",
    "text",
    "corrupt gzip",
    "cut gzip",
    "gzip of 4000 bytes",
    "half the data, gzipped",
    "truncated",
    "header only",
    "2-D",
    "zeros",
    "constant",
    "NaN",
    "+Inf",
    "-Inf",
    "no head",
    "header claims 1600^3",
    "header claims 20000^3",
    "scl_slope 1e36 on int16",
    "pixdim 0, qform",
    "pixdim 0, no qform or sform",
    "degenerate affine",
    "NaN affine",
    "km voxels",
    "far away",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
@pytest.mark.parametrize("output", ["--o", "--odir"])
def test_bad_input_is_refused_cleanly(tmp_path, capsys, case, output):
    """One line naming the file and the problem, exit 1, the input unchanged, nothing written
    (--odir: not even the log of a run refused before it started)."""
    path, expected = _bad_input(tmp_path, case)
    out_dir = tmp_path / "out"
    target = out_dir / "defaced.nii.gz" if output == "--o" else out_dir
    argv = ["--i", path, output, target, "--no-samseg"]
    # a header claiming 1600^3 once ran 218 s and died; refused from the header it takes < 1 s
    elapsed_s = 10.0 if "header claims" in case else 60.0
    line = refused(argv, capsys, [path], str(path), expected, elapsed_s=elapsed_s)
    if case == "scl_slope 1e36 on int16":  # once "fixed image has NaNs", which it has not
        assert "NaN" not in line
    if case == "no head" and output == "--odir":  # found by the engine: only the log, with it
        assert tree(out_dir) == {"log", "log/mideface.log"}
    else:
        assert not out_dir.exists()


# ----------------------------------------------------------------------------- a full disk


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    """A write the file system refuses names the output (not a staging or temp name, not the
    input) and leaves no temp file and no folder made for it."""
    target = tmp_path / "new" / "deeper" / "defaced.nii.gz"
    with pytest.raises(io.OutputError) as caught, io.atomic_path(target):
        _no_space()
    assert str(caught.value) == f"{target}: cannot be written (No space left on device)"
    assert tree(tmp_path) == set()
    # staged (--odir): the final name, and the staging folder gone
    src = tmp_path / "src.txt"
    src.write_text("x")
    publisher = io.Publisher([src])
    monkeypatch.setattr(shutil, "copyfile", _no_space)
    with pytest.raises(io.OutputError) as caught, publisher.staged(tmp_path / "od"):
        publisher.copy(src, tmp_path / "od" / "sub" / "stats.json")
    assert caught.value.path == str(tmp_path / "od" / "sub" / "stats.json")
    assert tree(tmp_path / "od") == set()


def test_a_log_that_cannot_be_written_stops_the_run_at_once(tmp_path, capsys, no_engine):
    """--log on a full device (/dev/full): one line naming the log, before any work, nothing
    written, and the device left as it was."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    device = os.stat("/dev/full")
    out = tmp_path / "out" / "defaced.nii.gz"
    argv = ["--i", HEAD, "--o", out, "--log", "/dev/full"]
    refused(argv, capsys, [HEAD], "/dev/full: cannot be written (No space left on device)")
    assert not (tmp_path / "out").exists()
    assert os.stat("/dev/full").st_rdev == device.st_rdev


def test_a_log_that_fills_up_during_the_run_is_reported(tmp_path, capsys, monkeypatch):
    """A log on another disk that fills while the run works: the run ends as it would, and one
    warning names the log and when it stopped (its lines were dropped without a word)."""
    log = tmp_path / "logs" / "run.log"

    def engine(*_args, **_kwargs):
        monkeypatch.setattr(common.LogFile, "flush", _no_space)
        common.PACKAGE_LOGGER.info("a step of the run")

    monkeypatch.setattr(base, "run_workflow", engine)
    code, _, err = run_cli(["--i", HEAD, "--o", tmp_path / "out.nii.gz", "--log", log], capsys)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert code == 0 and "error" not in err, err
    expected = (
        rf"mideface: warning: {re.escape(str(log))}: lines from \d\d:\d\d:\d\d on were not "
        rf"written \({os.strerror(errno.ENOSPC)}\)"
    )
    assert len(warnings) == 1 and re.fullmatch(expected, warnings[0]), warnings
    assert "done in" not in log.read_text()  # dropped after the failed write


@pytest.mark.parametrize(
    ("fails", "code"), [("flush", errno.ENOSPC), ("_open", errno.EROFS)], ids=["full", "read-only"]
)
def test_an_odir_whose_log_cannot_be_written_is_left_absent(
    tmp_path, capsys, monkeypatch, no_engine, fails, code
):
    """--odir on a full disk (the log's first line fails) or a read-only one (opening it fails):
    the run stops there, one line naming the log, and neither the log nor the folders made for
    it are left."""
    from mideface_nipype.cli import common

    def refuse(*_args, **_kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(common.LogFile, fails, refuse)
    od = tmp_path / "a" / "od"
    problem = f"{od / 'log' / 'mideface.log'}: cannot be written ({os.strerror(code)})"
    refused(["--i", HEAD, "--odir", od], capsys, [HEAD], problem)
    assert tree(tmp_path) == set()


def test_a_full_work_folder_is_named_and_its_graph_ends(tmp_path, capsys, monkeypatch):
    """A write refused in the work folder (the graph's own files, or a node's result) names the
    work folder, not the input; a MultiProc node whose result could not be written fails its
    graph (Nipype's MultiProc dropped the task and waited for ever: 10 minutes, measured)."""
    from concurrent.futures import Future

    from mideface_nipype.workflows.multiproc import MultiProcPlugin

    plugin = MultiProcPlugin(plugin_args={"n_procs": 1})
    try:
        lost = Future()
        lost.set_exception(FileNotFoundError("/w/register/result_register.pklz"))
        plugin._task_obj[7] = lost
        plugin._async_callback(lost)  # Nipype's raised here, and task 7 never ended
        result = plugin._get_result(7)
    finally:
        plugin.pool.shutdown()
    assert result["taskid"] == 7 and "result_register.pklz" in "".join(result["traceback"])
    crash = RuntimeError("OSError: [Errno 28] No space left on device\nFileNotFoundError: x")
    assert str(io.work_folder_error(crash, tmp_path / "w")) == (
        f"{tmp_path / 'w'}: the work folder cannot be written (No space left on device): "
        "free space there, or give --work-dir on another disk"
    )
    assert io.work_folder_error(RuntimeError("ValueError: bad"), tmp_path) is None
    # the command names the work folder (here the graph fails writing its own files)
    monkeypatch.setattr(base, "run_workflow", lambda *_a, **_k: _no_space())
    out, work = tmp_path / "out" / "defaced.nii.gz", tmp_path / "w"
    refused(["--i", HEAD, "--o", out, "--work-dir", work], capsys, [HEAD], f"{work}: the work")
    assert not out.parent.exists()


def test_a_rewritten_gzip_is_read_to_its_end_again(tmp_path, monkeypatch):
    """The gzip stream is read to its end once per file and process, and the steps that load
    the file again read it from memory (the same header, values, class and file name); the same
    name written again (corrupt only inside the stream, which nibabel does not see) is checked
    again, and a rewritten file's new values are read."""
    path = tmp_path / "head.nii.gz"
    shutil.copyfile(HEAD, path)
    first = io.load_volume(path)
    decompressed = []
    reader_read = gzip._GzipReader.read

    def counted(self, size=-1):
        decompressed.append(len(out := reader_read(self, size)))
        return out

    with monkeypatch.context() as patch:
        patch.setattr(gzip._GzipReader, "read", counted)
        again = io.load_volume(path)
        io.first_frame(again)
    # the second time from memory: only the header was decompressed (nibabel reads it in blocks)
    assert 0 < sum(decompressed) < 1 << 16 < path.stat().st_size
    on_disk = nib.load(path)
    assert type(again) is type(on_disk) and again.get_filename() == str(path)
    assert again.header.binaryblock == on_disk.header.binaryblock
    for img in (first, again):
        assert np.array_equal(io.stored_data(img), io.stored_data(on_disk))
        assert np.array_equal(io.first_frame(img), io.first_frame(on_disk))
    flipped = np.flip(io.stored_data(on_disk), 0)
    nib.save(io.like(on_disk, flipped), tmp_path / "new.nii.gz")
    os.replace(tmp_path / "new.nii.gz", path)
    assert np.array_equal(io.stored_data(io.load_volume(path)), flipped)
    corrupt, _ = _bad_input(tmp_path, "corrupt gzip")
    os.replace(corrupt, path)
    with pytest.raises(io.InputError, match="corrupt"):
        io.load_volume(path)


def test_max_gb_is_read_from_the_header_of_a_real_head(tmp_path, capsys, head, no_engine):
    refused(["--i", head, "--odir", tmp_path / "od", "--max-gb", "0.01"], capsys, [head], "0.01")
    assert io.needed_gb(nib.load(head).shape) < io.DEFAULT_MAX_GB


def _bad_output(tmp_path: Path, head: Path, case: str) -> tuple[list, Path, str]:
    """Arguments with an output that cannot or must not be written, the path named, a word."""
    if case == "output is the input":
        return ["--o", head], head, "overwrite the input"
    if case == "output is the input, spelled otherwise":
        other = tmp_path / "out" / ".." / head.name
        return ["--o", other], other, "overwrite the input"
    if case == "face mask is the input":
        out = tmp_path / "out" / "defaced.nii.gz"
        return ["--o", out, "--facemask", head], head, "overwrite the input"
    if case == "face mask is the output":
        out = tmp_path / "out" / "defaced.nii.gz"
        return ["--o", out, "--facemask", out], out, "two outputs"
    if case == "output is the input's sidecar":
        (tmp_path / "sub-01_T1w.json").write_text("{}\n")
        out = tmp_path / "sub-01_T1w.mgz"
        return ["--o", out], tmp_path / "sub-01_T1w.json", "overwrite the input"
    if case == "output folder is a file":
        blocker = tmp_path / "out"
        blocker.write_text("not a folder")
        out = blocker / "sub" / "defaced.nii.gz"
        return ["--o", out], out, "not a folder"
    if case == "output is a folder":
        out = tmp_path / "out" / "defaced.nii.gz"
        out.mkdir(parents=True)
        return ["--o", out], out, "is a folder"
    if case == "odir is a file":
        blocker = tmp_path / "out"
        blocker.write_text("not a folder")
        return ["--odir", blocker], blocker, "not a folder"
    if case == "read-only folder":
        folder = tmp_path / "out"
        folder.mkdir()
        folder.chmod(0o555)
        out = folder / "defaced.nii.gz"
        return ["--o", out], out, "not writable"
    raise KeyError(case)


BAD_OUTPUTS = [
    "output is the input",
    "output is the input, spelled otherwise",
    "face mask is the input",
    "face mask is the output",
    "output is the input's sidecar",
    "output folder is a file",
    "output is a folder",
    "odir is a file",
    pytest.param(
        "read-only folder",
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders"),
    ),
]


@pytest.mark.parametrize("case", BAD_OUTPUTS)
def test_bad_output_is_refused_before_any_work(tmp_path, capsys, case, no_engine):
    head = tmp_path / "sub-01_T1w.nii.gz"
    head.write_bytes(HEAD.read_bytes())
    if case == "output is the input, spelled otherwise":
        (tmp_path / "out").mkdir()
    extra, named, expected = _bad_output(tmp_path, head, case)
    files_before = tree(tmp_path)
    refused(["--i", head, *extra, "--no-samseg"], capsys, [head], str(named), expected)
    assert tree(tmp_path) == files_before  # nothing written


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    """A write that dies half-way leaves neither a partial output nor a temp file, and an
    existing output as it was."""
    img = nib.load(HEAD)
    target = tmp_path / "defaced.nii.gz"

    def dies_half_way(image, filename):
        Path(filename).write_bytes(b"half a volume")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", dies_half_way)
    named = f"{target}: cannot be written (No space left on device)"
    with pytest.raises(io.OutputError, match=re.escape(named)):
        io.Publisher([HEAD]).save_volume(img, target)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"previous result")
    with pytest.raises(io.OutputError, match=re.escape(named)):
        io.Publisher([HEAD], force=True).save_volume(img, target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert target.read_bytes() == b"previous result"


@pytest.mark.slow
def test_sigterm_during_a_run_leaves_no_output(tmp_path, head):
    """A scheduler's kill (SIGTERM) while the engine works: exit 130, only the log, saying so,
    and nothing in the folder it was started from (Nipype's crash file stays in the work dir)."""
    od = tmp_path / "od"
    here = tmp_path / "here"
    here.mkdir()
    before = state(head)
    proc = umask_run(["--i", head, "--odir", od, "--no-samseg"], 0o022, cwd=here)
    _wait_for([od / "log" / "mideface.log"], proc)
    time.sleep(2.0)  # inside the workflow
    assert proc.poll() is None
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; no output written" in err and "Traceback" not in err
    assert tree(od) == {"log", "log/mideface.log"} and state(head) == before
    assert "interrupted" in (od / "log" / "mideface.log").read_text()
    assert not list(tmp_path.glob(".*.lock")) and not list(here.iterdir())


@pytest.mark.slow
def test_o_without_suffix_is_said_to_be_a_folder_before_the_run(
    shared_run, tmp_path, capsys, monkeypatch, head
):
    said = []

    def before():
        said.append(capsys.readouterr().err)

    monkeypatch.setattr(base, "run_workflow", _sink_only(shared_run, before))
    out = tmp_path / "deface"
    assert run_cli(["--i", head, "--o", out, "--mgz", "--no-samseg"], capsys)[0] == 0
    assert f"--o {out} has no volume suffix: it is the output folder" in said[0]
    assert {"defaced.mgz", "face.mask.mgz", "stats.json"} <= tree(out)


def test_eval_refuses_to_write_onto_a_head_before_any_work(tmp_path, capsys):
    """mideface-eval publishes the same way: a head where it would write is refused at once."""
    out = tmp_path / "out"
    head = out / "defaced" / "mideface" / "IXI015.nii.gz"
    head.parent.mkdir(parents=True)
    shutil.copyfile(HEAD, head)
    before, files = state(head), tree(out)
    start = time.perf_counter()
    assert eval_cli.main([str(head), "--out", str(out), "--methods", "mideface"]) == 1
    assert time.perf_counter() - start < 10.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(head) in err[0] and "overwrite the input" in err[0]
    assert state(head) == before and tree(out) == files


def test_publisher_modes_and_rollback_touch_only_its_own_files(tmp_path):
    """An explicit mode (in-place keeps the original's) wins over the umask; rollback removes
    what this publisher wrote, files it did not write stay."""
    other = tmp_path / "other.txt"
    other.write_text("not ours\n")
    publisher = io.Publisher([HEAD])
    old = os.umask(0o077)
    try:
        kept = publisher.write_text("a\n", tmp_path / "kept.txt", mode=0o640)
        masked = publisher.copy(other, tmp_path / "sub" / "copy.txt")
    finally:
        os.umask(old)
    assert kept.stat().st_mode & 0o777 == 0o640 and masked.stat().st_mode & 0o777 == 0o600
    with pytest.raises(io.OutputError, match="overwrite the input"):
        publisher.write_text("x", other)  # copy() made it a file the run reads
    publisher.rollback()
    assert tree(tmp_path) == {"other.txt", "sub"} and other.read_text() == "not ours\n"
