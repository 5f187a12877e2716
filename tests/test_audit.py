"""``mideface-audit`` on real heads: intact faces flagged, defaced heads pass, the box, BIDS."""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from brain import shared_brain_mask
from conftest import ATLAS_SOURCES_DIR, HEADS_DIR, default_run

from mideface_nipype.cli import mideface as cli
from mideface_nipype.cli import mideface_audit as audit_cli
from mideface_nipype.engine import register
from mideface_nipype.evaluation import audit, peers
from mideface_nipype.utils import io

#: quickshear (a peer under test, not ours) warns about numpy 2's 2-D cross products.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:quickshear")

IXI = "IXI012-HH-1211-T1_ds.nii.gz"
DCMQA = "dcmqa-xa30_T1w_2mm.nii.gz"
COLIN = "colin27_ch2_T1w.nii.gz"

#: File in the audited folder -> expected (verdict, reason); reasons of out-of-view vary.
EXPECTED = {
    "intact_IXI012.nii.gz": (audit.FACE_IN_VIEW, ""),
    "intact_dcmqa.nii.gz": (audit.FACE_IN_VIEW, ""),
    "boxcut_colin27.nii.gz": (audit.OUT_OF_VIEW, None),
    "mideface_IXI012.nii.gz": (audit.DEFACED, audit.BY_MIDEFACE),
    "misapplied_up_IXI012.nii.gz": (audit.FACE_IN_VIEW, audit.STAMPED_NOSE),
    "misapplied_upback_IXI012.nii.gz": (audit.FACE_IN_VIEW, audit.STAMPED),
    "pydeface_IXI012.nii.gz": (audit.DEFACED, audit.ZEROED),
    "quickshear_dcmqa.nii.gz": (audit.DEFACED, audit.ZEROED),
}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = audit_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _tsv(path: Path) -> list[dict[str, str]]:
    header, *rows = path.read_text().splitlines()
    assert header.split("\t") == list(audit_cli.TSV_COLUMNS)
    return [dict(zip(audit_cli.TSV_COLUMNS, row.split("\t"), strict=True)) for row in rows]


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Path:
    """A folder of intact heads and heads defaced by mideface, the pydeface method, quickshear."""
    folder = tmp_path_factory.mktemp("heads")
    (folder / "intact_IXI012.nii.gz").symlink_to(HEADS_DIR / IXI)
    (folder / "intact_dcmqa.nii.gz").symlink_to(HEADS_DIR / DCMQA)
    (folder / "boxcut_colin27.nii.gz").symlink_to(HEADS_DIR / COLIN)
    # the session's run of the head (its --o output is the same volume)
    shutil.copyfile(
        default_run(IXI, "--pics") / "defaced.nii.gz", folder / "mideface_IXI012.nii.gz"
    )
    ixi = io.load_volume(HEADS_DIR / IXI)
    # the head moved in the scanner (mm, world RAS), its face mask applied by the header alone:
    # the mask misses much of the face, and the output carries the provenance code
    mask = default_run(IXI, "--pics") / "face.mask.nii.gz"
    for name, shift_mm in (("up", (0, 0, 30)), ("upback", (0, -20, 30))):
        moved, affine = tmp_path_factory.mktemp(name) / "moved.nii.gz", ixi.affine.copy()
        affine[:3, 3] += shift_mm
        nib.save(nib.Nifti1Image(io.stored_data(ixi), affine), moved)
        out = folder / f"misapplied_{name}_IXI012.nii.gz"
        assert cli.main(["--apply", str(moved), str(mask), "regheader", str(out)]) == 0
    nib.save(peers.pydeface_ants(ixi), folder / "pydeface_IXI012.nii.gz")
    dcmqa = io.load_volume(HEADS_DIR / DCMQA)
    brain = shared_brain_mask(dcmqa, ATLAS_SOURCES_DIR)
    nib.save(peers.quickshear_deface(dcmqa, brain), folder / "quickshear_dcmqa.nii.gz")
    return folder


@pytest.fixture(scope="module")
def audited(heads, tmp_path_factory):
    """One run of the command on the folder: exit code, terminal output, output folder."""
    out_dir = tmp_path_factory.mktemp("audit")
    code = audit_cli.main([str(heads), "--out-dir", str(out_dir), "--quiet"])
    return code, out_dir


@pytest.mark.slow
def test_verdicts_on_real_heads(audited):
    _, out_dir = audited
    rows = {Path(r["path"]).name: r for r in _tsv(out_dir / audit_cli.TSV_NAME)}
    assert set(rows) == set(EXPECTED)
    for name, (verdict, reason) in EXPECTED.items():
        row = rows[name]
        assert row["verdict"] == verdict, (name, row)
        if reason is not None:
            assert row["reason"] == reason, (name, row)
        assert row["flagged"] == ("yes" if verdict == audit.FACE_IN_VIEW else "no")
    # the measures behind the verdicts
    assert float(rows["intact_IXI012.nii.gz"]["nose_without_skin"]) < 0.2
    assert float(rows["pydeface_IXI012.nii.gz"]["nose_without_skin"]) > 0.5
    assert float(rows["boxcut_colin27.nii.gz"]["face_in_box"]) < audit.FULL_FACE_IN_BOX
    assert float(rows["intact_dcmqa.nii.gz"]["face_in_box"]) >= audit.FULL_FACE_IN_BOX
    assert int(rows["intact_dcmqa.nii.gz"]["views_with_face"]) >= audit.MIN_VIEWS
    # a stamped image is examined like any other (never taken on trust)
    for name in ("mideface", "misapplied_up", "misapplied_upback"):
        assert float(rows[f"{name}_IXI012.nii.gz"]["head_dice"]) >= register.MIN_HEAD_DICE
    assert float(rows["mideface_IXI012.nii.gz"]["nose_without_skin"]) > 0.9
    assert float(rows["misapplied_up_IXI012.nii.gz"]["nose_without_skin"]) < 0.5
    assert int(rows["misapplied_upback_IXI012.nii.gz"]["views_with_face"]) >= audit.MIN_VIEWS


def _figures(section: str) -> list[tuple[str, bytes]]:
    found = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', section)
    return [(Path(alt).name, base64.b64decode(data)) for data, alt in found]


@pytest.mark.slow
def test_exit_code_and_html(audited):
    code, out_dir = audited
    assert code == audit_cli.EXIT_FLAGGED
    page = (out_dir / audit_cli.HTML_NAME).read_text()
    assert "4 flagged" in page
    _, flagged, cut = page.split("<h2>")
    assert flagged.startswith("Flagged images")
    assert sorted(name for name, _ in _figures(flagged)) == [
        "intact_IXI012.nii.gz",
        "intact_dcmqa.nii.gz",
        "misapplied_up_IXI012.nii.gz",
        "misapplied_upback_IXI012.nii.gz",
    ]
    assert [name for name, _ in _figures(cut)] == ["boxcut_colin27.nii.gz"]
    for _, png in _figures(page):
        assert png.startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.slow
def test_clean_folder_exits_0_and_prints_the_table(heads, tmp_path, capsys):
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "a.nii.gz").symlink_to(heads / "mideface_IXI012.nii.gz")
    code, out, _ = _run([str(clean), "-o", str(tmp_path / "out")], capsys)
    assert code == audit_cli.EXIT_CLEAN
    assert "0 of 1 images flagged" in out
    assert re.search(r"a\.nii\.gz\s+defaced\s+mideface", out)
    assert "none" in (tmp_path / "out" / audit_cli.HTML_NAME).read_text()


def _bids_tree(root: Path, image: Path) -> list[str]:
    """A small BIDS dataset of symlinks to ``image``; returns the anatomical images' paths."""
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9"}))
    anat = [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_T2w.nii.gz",
        "sub-02/ses-pre/anat/sub-02_ses-pre_T1w.nii.gz",
        "sub-02/ses-post/anat/sub-02_ses-post_acq-fast_FLAIR.nii",
    ]
    other = [
        "sub-01/anat/sub-01_mod-T1w_defacemask.nii.gz",  # BIDS's own defacing mask
        "sub-01/anat/sub-01_acq-scout_T1w.nii.gz",  # in .bidsignore
        "sub-01/func/sub-01_task-rest_bold.nii.gz",
        "derivatives/mideface/sub-01/anat/sub-01_T1w.nii.gz",
        "sourcedata/sub-01/anat/sub-01_T1w.nii.gz",
    ]
    for rel in anat + other:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".nii"):
            nib.save(nib.load(image), root / rel)
        else:
            (root / rel).symlink_to(image)
    (root / ".bidsignore").write_text("# scouts\n*_acq-scout_*\n")
    return sorted(str(root / rel) for rel in anat)


@pytest.mark.slow
def test_bids_form_finds_every_anatomical_image(heads, tmp_path, capsys):
    root = tmp_path / "ds"
    expected = _bids_tree(root, heads / "mideface_IXI012.nii.gz")
    assert [str(p) for p in audit_cli.find_images([root])] == expected
    code, _, _ = _run([str(root), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code == audit_cli.EXIT_CLEAN
    rows = _tsv(tmp_path / "out" / audit_cli.TSV_NAME)
    assert [r["path"] for r in rows] == expected
    assert {(r["verdict"], r["reason"]) for r in rows} == {(audit.DEFACED, audit.BY_MIDEFACE)}


@pytest.mark.slow
def test_formats_nibabel_only_reads_are_audited(tmp_path, capsys):
    """A folder scan skipped SPM's NIfTI pairs and ``.nii.bz2`` without a word, and printed
    "1 of 1 images flagged" beside two faces it never looked at."""
    data = tmp_path / "data"
    data.mkdir()
    src = nib.load(HEADS_DIR / IXI)
    nib.save(nib.Nifti1Pair(src.dataobj.get_unscaled(), src.affine, src.header), data / "p.hdr")
    nib.save(src, data / "b.nii.bz2")
    (data / "c.nii.gz").symlink_to(HEADS_DIR / IXI)
    names = ["b.nii.bz2", "c.nii.gz", "p.hdr"]  # the pair once, by its header
    assert audit_cli.find_images([data]) == [data / n for n in names]
    code, _, _ = _run([str(data / "p.hdr"), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code == audit_cli.EXIT_FLAGGED
    [row] = _tsv(tmp_path / "out" / audit_cli.TSV_NAME)
    assert row["verdict"] == audit.FACE_IN_VIEW


@pytest.mark.parametrize("case", ["missing", "not-a-volume", "corrupt", "empty-folder"])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, capsys, case):
    good = HEADS_DIR / IXI  # read first, never audited: every input is checked before any work
    bad = {
        "missing": tmp_path / "missing.nii.gz",
        "not-a-volume": tmp_path / "notes.txt",
        "corrupt": tmp_path / "corrupt.nii.gz",
        "empty-folder": tmp_path / "empty",
    }[case]
    if case == "not-a-volume":
        bad.write_text("hello")
    elif case == "corrupt":
        bad.write_text("not a volume")
    elif case == "empty-folder":
        bad.mkdir()
    out_dir = tmp_path / "out"
    code, out, err = _run([str(good), str(bad), "-o", str(out_dir)], capsys)
    assert code == audit_cli.EXIT_ERROR
    assert len(err.strip().splitlines()) == 1 and str(bad) in err, err
    assert not out_dir.exists() and out == ""


@pytest.mark.slow
def test_an_image_without_head_is_not_audited_and_the_rest_is(heads, tmp_path, capsys):
    cube = np.zeros((40, 40, 40), np.float32)
    cube[15:25, 15:25, 15:25] = 100.0  # 8 mL: no head
    nib.save(nib.Nifti1Image(cube, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "cube.nii.gz")
    defaced = heads / "mideface_IXI012.nii.gz"
    out_dir = tmp_path / "out"
    code, _, err = _run([str(tmp_path / "cube.nii.gz"), str(defaced), "-o", str(out_dir)], capsys)
    assert code == audit_cli.EXIT_ERROR
    assert err.count("error:") == 1 and "cube.nii.gz: cannot be audited (no head" in err
    rows = _tsv(out_dir / audit_cli.TSV_NAME)
    assert [r["verdict"] for r in rows] == [audit_cli.NOT_AUDITED, audit.DEFACED]


def test_missing_eval_extra_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib now raises ImportError
    code, _, err = _run([str(HEADS_DIR / IXI), "-o", str(tmp_path / "out")], capsys)
    assert code == audit_cli.EXIT_ERROR
    assert len(err.strip().splitlines()) == 1
    assert "dlib" in err and "mideface-nipype[eval]" in err
    assert not (tmp_path / "out").exists()


def test_usage_error_exits_2_and_help_explains(capsys):
    with pytest.raises(SystemExit) as exc:
        audit_cli.main([])
    assert exc.value.code == audit_cli.EXIT_ERROR
    with pytest.raises(SystemExit):
        audit_cli.main(["--help"])
    text = capsys.readouterr().out
    for word in (audit.FACE_IN_VIEW, audit.ZEROED, audit.NOISE, audit.OUT_OF_VIEW, "BIDS"):
        assert word in text
    assert "exit status" in text


def test_judge_rules():
    judge = audit.judge
    good = 0.92  # head Dice of a registration that landed
    assert judge(3, 1.0, 0.0, good) == (audit.FACE_IN_VIEW, "")
    assert judge(2, 0.6, float("nan"), good) == (audit.FACE_IN_VIEW, "")
    assert judge(1, 1.0, 0.0, good) == (audit.DEFACED, audit.NOISE)
    # a missing nose wins over weak detections of the orbits behind a cutting plane
    assert judge(3, 1.0, 0.75, good) == (audit.DEFACED, audit.ZEROED)
    assert judge(0, 0.3, float("nan"), good)[0] == audit.OUT_OF_VIEW
    assert judge(0, 0.7, 0.0, good) == (
        audit.OUT_OF_VIEW,
        "30% of the face outside the box, no face in the rest",
    )
    # a registration that missed the head: the region measures are not trusted
    assert judge(3, 1.0, 1.0, 0.5) == (audit.FACE_IN_VIEW, "")
    assert judge(0, 0.3, 1.0, 0.5) == (audit.DEFACED, audit.NOISE)
