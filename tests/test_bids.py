"""``mideface-bids``: dataset discovery, BIDS-derivative outputs, MultiProc, kill and resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bids_data import (
    NOISE_SUBJECT,
    RUN_OPTIONS,
    SUBJECTS,
    TOP_T1W_META,
    reference_run,
    run_cli,
    tree,
    truth,
)
from brain import independent_brain_mask
from conftest import HEADS_DIR
from PIL import Image

from mideface_nipype.cli import mideface as mideface_cli
from mideface_nipype.cli import mideface_bids as bids_cli
from mideface_nipype.engine import apply, fill, headmask
from mideface_nipype.engine.atlas import META_FILE, atlas_dir
from mideface_nipype.interfaces.bids import ReplaceRaw
from mideface_nipype.interfaces.outputs import Publish
from mideface_nipype.reports import report, slices
from mideface_nipype.utils import bids, io
from mideface_nipype.workflows import bids as bids_workflows

#: Seconds the kill test waits for the first subject's registration to finish.
KILL_WAIT_S = 180


@pytest.fixture(scope="session")
def reference():
    return reference_run()


def _volume(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(value).integers(0, 200, (24, 8, 8)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def _small_dataset(root: Path) -> Path:
    """A layout to discover: sessions, a session with no T1w, a subject with no anat, dwi."""
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    for rel in (
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_FLAIR.nii.gz",
        "sub-01/anat/sub-01_acq-fast_T2w.nii.gz",
        "sub-01/dwi/sub-01_dwi.nii.gz",
        "sub-02/ses-a/anat/sub-02_ses-a_run-2_T1w.nii.gz",
        "sub-02/ses-a/anat/sub-02_ses-a_run-1_T1w.nii.gz",
        "sub-02/ses-b/anat/sub-02_ses-b_T2w.nii.gz",
    ):
        _volume(root / rel)
    (root / "sub-03" / "func").mkdir(parents=True)
    (root / "sub-01/anat/sub-01_T1w.json").write_text('{"EchoTime": 0.003}')
    return root


def test_discover_sessions_and_participant_labels(tmp_path):
    root = _small_dataset(tmp_path / "ds")
    sessions = bids.discover(root)
    assert [(s.subject, s.session) for s in sessions] == [("01", None), ("02", "a")]
    one, two = sessions
    assert one.reference == "sub-01/anat/sub-01_T1w.nii.gz"
    assert one.others == (
        "sub-01/anat/sub-01_FLAIR.nii.gz",
        "sub-01/anat/sub-01_acq-fast_T2w.nii.gz",
    )
    # the first T1w (sorted) is the reference; another T1w run is defaced with its mask
    assert two.reference.endswith("sub-02_ses-a_run-1_T1w.nii.gz")
    assert two.others == ("sub-02/ses-a/anat/sub-02_ses-a_run-2_T1w.nii.gz",)
    assert two.name == "sub_02_ses_a"
    assert [s.subject for s in bids.discover(root, ["sub-02"])] == ["02"]
    assert [s.subject for s in bids.discover(root, ["01"])] == ["01"]
    with pytest.raises(io.InputError, match="no participant 07"):
        bids.discover(root, ["07"])
    # every anatomical suffix of BIDS, not the defacemask; .bidsignore honoured
    for rel in (
        "sub-01/anat/sub-01_UNIT1.nii.gz",
        "sub-01/anat/sub-01_inv-1_MP2RAGE.nii.gz",
        "sub-01/anat/sub-01_T1map.nii",
        "sub-01/anat/sub-01_echo-1_MEGRE.nii.gz",
        "sub-01/anat/sub-01_inplaneT1.nii.gz",
        "sub-01/anat/sub-01_defacemask.nii.gz",
        "sub-01/anat/sub-01_acq-skip_T2w.nii.gz",
        "sub-02/ses-a/anat/sub-02_ses-a_run-3_T1w.nii.gz",
    ):
        _volume(root / rel)
    (root / ".bidsignore").write_text("# not BIDS\n*acq-skip*\nsub-02/ses-a/anat/*run-3*\n")
    one, two = bids.discover(root)
    assert one.others == (
        "sub-01/anat/sub-01_FLAIR.nii.gz",
        "sub-01/anat/sub-01_T1map.nii",
        "sub-01/anat/sub-01_UNIT1.nii.gz",
        "sub-01/anat/sub-01_acq-fast_T2w.nii.gz",
        "sub-01/anat/sub-01_echo-1_MEGRE.nii.gz",
        "sub-01/anat/sub-01_inplaneT1.nii.gz",
        "sub-01/anat/sub-01_inv-1_MP2RAGE.nii.gz",
    )
    assert two.others == ("sub-02/ses-a/anat/sub-02_ses-a_run-2_T1w.nii.gz",)
    assert set(bids.ANAT_SUFFIXES) >= {"T1w", "T2w", "FLAIR", "UNIT1", "T1map", "MP2RAGE", "PD"}
    assert "defacemask" not in bids.ANAT_SUFFIXES and len(bids.ANAT_SUFFIXES) == 36
    (root / ".bidsignore").write_text("sub-02/\n")
    assert [s.subject for s in bids.discover(root)] == ["01"]
    assert not bids.is_ignored("sub-02_T1w.nii.gz", ["sub-02/"])  # a folder-only pattern
    assert bids.is_ignored("sub-01/anat/x_T1w.nii.gz", ["**/anat/x_*"])
    (root / ".bidsignore").unlink()
    # fMRIPrep's --bids-filter-file: labels, lists, null (absent), "*", another reference
    filters = tmp_path / "filters.json"
    filters.write_text(
        json.dumps(
            {
                "t1w": {"session": ["a", "b"], "run": 2},
                "t2w": {"acquisition": None},
                "bold": {"task": "rest"},
            }
        )
    )
    (two,) = bids.discover(root, filters=bids.load_filters(filters))
    assert two.reference.endswith("sub-02_ses-a_run-2_T1w.nii.gz") and two.others == ()
    filters.write_text(json.dumps({"t1w": {"suffix": "UNIT1"}, "flair": {"acquisition": "*"}}))
    (one,) = bids.discover(root, filters=bids.load_filters(filters))
    assert one.reference == "sub-01/anat/sub-01_UNIT1.nii.gz"
    assert "sub-01/anat/sub-01_T1w.nii.gz" in one.others
    assert "sub-01/anat/sub-01_FLAIR.nii.gz" not in one.others
    filters.write_text(json.dumps({"t1w": {"sesion": "a"}}))
    with pytest.raises(io.InputError, match=r"filters.json: unknown entity 'sesion' in query"):
        bids.load_filters(filters)
    filters.write_text("{broken")
    with pytest.raises(io.InputError, match="filters.json: unreadable JSON"):
        bids.load_filters(filters)
    (root / "dataset_description.json").unlink()
    with pytest.raises(io.InputError, match="not a BIDS dataset"):
        bids.discover(root)


def test_anat_suffixes_are_those_of_the_bids_schema():
    """The constant, written once from BIDS 1.11.1, against the schema pybids ships."""
    schema = pytest.importorskip(
        "bidsschematools.schema", reason="bidsschematools not installed (pybids, test extra)"
    ).load_schema()
    anat = schema["rules"]["files"]["raw"]["anat"]
    defined = [s for rule in anat.values() for s in rule["suffixes"] if s != "defacemask"]
    assert sorted(bids.ANAT_SUFFIXES) == sorted(defined)


def test_derivative_names_and_sidecar_inheritance(tmp_path):
    assert bids.defaced_name("sub-01/anat/sub-01_T1w.nii.gz") == (
        "sub-01/anat/sub-01_desc-defaced_T1w.nii.gz"
    )
    assert bids.face_mask_name("sub-01/anat/sub-01_T1w.nii.gz", reference=True) == (
        "sub-01/anat/sub-01_desc-face_dseg.nii.gz"
    )
    assert bids.face_mask_name("sub-01/ses-1/anat/sub-01_ses-1_acq-x_T2w.nii", reference=False) == (
        "sub-01/ses-1/anat/sub-01_ses-1_acq-x_desc-faceT2w_dseg.nii.gz"
    )
    assert bids.exclusion_mask_name("sub-01/anat/sub-01_run-1_T1w.nii") == (
        "sub-01/anat/sub-01_run-1_desc-exclusion_mask.nii.gz"
    )
    assert bids.transform_name("sub-01/anat/sub-01_T1w.nii.gz") == (
        "sub-01/anat/sub-01_from-T1w_to-mideface_mode-image_xfm.txt"
    )
    # the labels of the published face mask: the two sides of the template face
    rows = [line.split("\t") for line in bids.face_labels_tsv().splitlines()]
    assert rows[0][:2] == ["index", "name"] and [r[0] for r in rows[1:]] == list("013")
    assert bids.sidecar_path("sub-01/anat/sub-01_T1w.nii.gz") == "sub-01/anat/sub-01_T1w.json"
    root = _small_dataset(tmp_path / "ds")
    (root / "T1w.json").write_text('{"EchoTime": 1, "Manufacturer": "A"}')
    (root / "acq-fast_T1w.json").write_text('{"Manufacturer": "not this one"}')
    (root / "sub-01" / "sub-01_T1w.json").write_text('{"Manufacturer": "B", "FlipAngle": 8}')
    meta = bids.inherited_metadata(root, "sub-01/anat/sub-01_T1w.nii.gz")
    assert meta == {"EchoTime": 0.003, "Manufacturer": "B", "FlipAngle": 8}
    (root / "sub-01" / "sub-01_T1w.json").write_text("{broken")
    with pytest.raises(io.InputError, match="sub-01_T1w.json: unreadable JSON"):
        bids.inherited_metadata(root, "sub-01/anat/sub-01_T1w.nii.gz")


def test_outputs_are_written_atomically_and_in_place_keeps_originals(tmp_path, monkeypatch):
    root = _small_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    session = bids.discover(root, ["01"])[0]
    raw = {rel: (root / rel).read_bytes() for rel in (session.reference, *session.others)}
    results = {
        rel: _volume(tmp_path / "work" / Path(rel).name, i + 10)
        for i, rel in enumerate((session.reference, *session.others))
    }
    mask = _volume(tmp_path / "work" / "mask.nii.gz", 99)

    transform = tmp_path / "work" / "transform.txt"
    transform.write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    report_file = tmp_path / "work" / "report.html"
    report_file.write_text("<html></html>")

    def write(session: bids.Session, out: Path, *, in_place: bool = False) -> list[str]:
        """The session's sink (and, in place, its raw-image replacement) on these results."""
        outputs = bids_workflows.session_outputs(
            session, bids_dir=root, output_dir=out, in_place=in_place
        )
        values = {
            "out_file": str(results[session.reference]),
            "face_mask": str(mask),
            "exclusion_mask": str(mask),
            "other_out_files": [str(results[r]) for r in session.others],
            "other_face_masks": [str(mask)] * len(session.others),
            "transform": str(transform),
            "report": str(report_file),
        }
        sink = Publish(
            fields=list(outputs.destinations),
            destinations=outputs.destinations,
            texts=outputs.texts,
            in_mm=list(outputs.in_mm),
            reads=list(outputs.reads),
            force=outputs.force,
            clear_stale=outputs.clear_stale,
            **{field: values[field] for field in outputs.destinations},
        )
        written = list(sink.run(cwd=str(tmp_path)).outputs.out_files)
        if in_place:
            replace = ReplaceRaw(
                bids_dir=str(root),
                output_dir=str(out),
                images=list(session.published),
                reference_defaced=values["out_file"],
                other_defaced=values["other_out_files"],
            )
            written += replace.run(cwd=str(tmp_path)).outputs.out_files
        return written

    # a copy that dies half way leaves neither the target nor its temporary file
    def broken_copy(src, dst):
        Path(dst).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(io.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        write(session, out)
    monkeypatch.undo()
    assert [p for p in out.rglob("*") if p.is_file()] == []  # sidecars written before: removed
    # a temporary file left by a killed run is cleared when its target is written
    stale = out / "sub-01/anat/.sub-01_desc-defaced_T1w.nii.gz.abc123"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half")
    written = write(session, out)
    assert not stale.exists()
    defaced_t1w = out / "sub-01/anat/sub-01_desc-defaced_T1w.nii.gz"
    # the test volumes have no spatial units: written in mm, voxels unchanged
    assert nib.load(defaced_t1w).header.get_xyzt_units()[0] == "mm"
    assert np.array_equal(
        io.stored_data(nib.load(defaced_t1w)), io.stored_data(nib.load(results[session.reference]))
    )
    assert (out / "sub-01/anat/sub-01_desc-faceFLAIR_dseg.nii.gz").exists()
    assert (out / "sub-01/anat/sub-01_acq-fast_desc-faceT2w_dseg.tsv").exists()
    assert (out / "sub-01/figures/sub-01_report.html").read_text() == "<html></html>"
    assert all(Path(p).is_file() for p in written) and len(written) == 3 * 5 + 4
    assert sorted(written) == sorted(
        map(str, bids.expected_outputs(session, root, out, in_place=False))
    )
    sidecar = json.loads((out / "sub-01/anat/sub-01_desc-defaced_T1w.json").read_text())
    assert sidecar["EchoTime"] == 0.003 and sidecar["SkullStripped"] is False
    assert sidecar["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    assert sidecar["SpatialReference"] == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
    mask_meta = json.loads((out / "sub-01/anat/sub-01_desc-faceFLAIR_dseg.json").read_text())
    assert mask_meta["SpatialReference"] == "bids:raw:sub-01/anat/sub-01_FLAIR.nii.gz"
    assert mask_meta["Sources"] == [
        "bids:raw:sub-01/anat/sub-01_T1w.nii.gz",
        "bids:raw:sub-01/anat/sub-01_FLAIR.nii.gz",
    ]

    # in place: each raw image is kept (and recorded) before the graph runs, the defaced ones
    # replace them (checksums recorded first), a rerun has nothing to do
    out2 = tmp_path / "out2"
    rels = (session.reference, *session.others)
    (planned,) = bids.prepare_in_place([session], root, out2)
    kept_root = out2.resolve() / bids.ORIGINALS_DIR
    assert planned.source_root == kept_root and planned.images == rels
    manifest = bids.read_manifest(out2)
    for rel, data in raw.items():
        assert planned.source(rel).read_bytes() == data
        assert manifest["images"][rel] == {
            "original_sha256": hashlib.sha256(data).hexdigest(),
            "defaced_sha256": None,
        }
    written = write(planned, out2, in_place=True)
    assert {str(root.resolve() / rel) for rel in rels} <= set(written)
    manifest = bids.read_manifest(out2)
    for rel in rels:
        assert (root / rel).read_bytes() == results[rel].read_bytes()
        assert manifest["images"][rel]["defaced_sha256"] == bids.sha256(results[rel])
    assert bids.prepare_in_place([session], root, out2) == []
    # another image defaced elsewhere is skipped; new raw data is kept (the old original too)
    # and defaced with the face mask of the reference, which is not written again
    flair, t2w = session.others
    img = nib.load(root / flair)
    io.save_atomic(io.like(img, fill.embed_code(io.stored_data(img))), root / flair)
    _volume(root / t2w, 77)
    (planned,) = bids.prepare_in_place([session], root, out2)
    assert planned.others == (t2w,) and not planned.publish_reference
    assert planned.published == (t2w,)
    assert (kept_root / t2w).read_bytes() == (root / t2w).read_bytes()
    old = manifest["images"][t2w]["original_sha256"]
    assert (kept_root / bids.SUPERSEDED_DIR / old[:16] / t2w).read_bytes() == raw[t2w]
    assert (kept_root / flair).read_bytes() == raw[flair]
    # an output folder that keeps another dataset's originals is refused
    other = _small_dataset(tmp_path / "other")
    with pytest.raises(io.OutputError, match="belongs to another dataset"):
        bids.check_output_folder(other, out2)


def test_defaced_images_are_planned_out_and_names_checked(tmp_path, caplog):
    root = _small_dataset(tmp_path / "ds")
    sessions = bids.discover(root, ["01"])
    t1w, flair, t2w = (root / rel for rel in sessions[0].images)
    img = nib.load(flair)
    nib.save(io.like(img, fill.embed_code(io.stored_data(img))), flair)
    (root / "sub-01/anat/sub-01_acq-fast_T2w.json").write_text('{"Defacing": {}}')
    with caplog.at_level("INFO", logger="mideface_nipype"):
        (planned,) = bids.plan_derivatives(sessions, root, tmp_path / "out")
    assert planned.images == (sessions[0].reference,)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [
        "sub-01/anat/sub-01_FLAIR.nii.gz: already defaced (it carries the mideface provenance "
        "code); skipped (--force defaces it again)",
        "sub-01/anat/sub-01_acq-fast_T2w.nii.gz: already defaced (sub-01_acq-fast_T2w.json has a "
        "Defacing record); skipped (--force defaces it again)",
    ]
    # a defaced reference cannot give the others their face mask
    img = nib.load(t1w)
    nib.save(io.like(img, io.stored_data(img), descrip=io.defaced_descrip()), t1w)
    (root / "sub-01/anat/sub-01_acq-fast_T2w.json").unlink()
    with pytest.raises(io.InputError, match=r"sub-01_T1w.nii.gz: is defaced already \(its NIfTI"):
        bids.plan_derivatives(sessions, root, tmp_path / "out")
    forced = bids.plan_derivatives(sessions, root, tmp_path / "out", force=True)
    assert [s.images for s in forced] == [sessions[0].images]
    # a file naming another subject than its folder
    t2w.rename(root / "sub-01/anat/sub-02_T2w.nii.gz")
    with pytest.raises(
        io.InputError, match="sub-02_T2w.nii.gz: is in the sub-01 folder but its name has sub-02"
    ):
        bids.discover(root)


def test_a_work_folder_inside_the_dataset_or_the_output_is_refused(tmp_path, capsys):
    """Nipype's folders would land in the raw dataset (or the derivative): one line naming the
    work folder, nothing written (as fMRIPrep refuses a work folder in its input)."""
    root = _small_dataset(tmp_path / "ds")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    out = tmp_path / "out"
    for work in (root, root / "work", root / "derivatives" / "work", out / "work"):
        code = bids_cli.main([str(root), str(out), "participant", "-w", str(work)])
        err = capsys.readouterr().err.strip().splitlines()
        inside = f"the output folder {out}" if out in work.parents else f"the dataset {root}"
        assert code == 1 and err == [
            f"mideface-bids: error: {work}: the work folder is inside {inside}; "
            "give --work-dir outside it"
        ]
        assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
        assert not out.exists()


def test_cli_bad_input_one_line_no_output(tmp_path, capsys):
    root = _small_dataset(tmp_path / "ds")
    broken = root / "sub-01/anat/sub-01_FLAIR.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    out = tmp_path / "out"
    code = bids_cli.main([str(root), str(out), "participant", "-w", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("mideface-bids: error:")]
    assert code == 1 and len(errors) == 1
    assert errors[0].startswith(f"mideface-bids: error: {broken}: ")
    assert any("sub-02/ses-b: no T1w, skipped" in line for line in err)
    assert not out.exists()
    assert bids_cli.main([str(root), str(root), "participant"]) == 1
    assert "overwrite the dataset" in capsys.readouterr().err
    code = bids_cli.main([str(root), str(out), "participant", "--plugin-args", "{x"])
    assert code == 1 and "--plugin-args: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:  # refused by the command line, before any work
        bids_cli.main([str(root), str(out), "participant", "--seed", "-1"])
    assert stopped.value.code == 1
    assert "argument --seed: -1 is out of range" in capsys.readouterr().err


def _changed(before: nib.spatialimages.SpatialImage, after: nib.spatialimages.SpatialImage):
    """Voxels the defacing changed, without the provenance code in voxels (0..n, 0, 0)."""
    changed = io.stored_data(before) != io.stored_data(after)
    changed[: len(fill.CODE_TAG), 0, 0] = False
    return changed


def test_multiproc_dataset_derivatives(reference):
    base, bids_dir, out = reference
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "mideface-nipype"
    raw = json.loads((bids_dir / "dataset_description.json").read_text())
    assert description["License"] == raw["License"] and description["Authors"] == raw["Authors"]
    assert description["SourceDatasets"] == [{"URL": "bids:raw:", "DOI": raw["DatasetDOI"]}]
    assert (out / description["DatasetLinks"]["raw"]).resolve() == bids_dir.resolve()
    known = truth(base)
    for subject, session, head in SUBJECTS:
        folder = f"sub-{subject}" + (f"/ses-{session}" if session else "") + "/anat"
        prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        t1_rel, t2_rel = f"{folder}/{prefix}_T1w.nii.gz", f"{folder}/{prefix}_T2w.nii.gz"
        t1, t2 = nib.load(bids_dir / t1_rel), nib.load(bids_dir / t2_rel)
        t1_out = nib.load(out / f"{folder}/{prefix}_desc-defaced_T1w.nii.gz")
        t2_out = nib.load(out / f"{folder}/{prefix}_desc-defaced_T2w.nii.gz")
        for before, after in ((t1, t1_out), (t2, t2_out)):
            assert after.shape == before.shape and np.allclose(after.affine, before.affine)
            assert after.get_data_dtype() == before.get_data_dtype()
            assert fill.check_code(io.stored_data(after))
        meta = json.loads((out / f"{folder}/{prefix}_desc-defaced_T1w.json").read_text())
        assert meta["MagneticFieldStrength"] == TOP_T1W_META["MagneticFieldStrength"]
        assert meta["EchoTime"] == 0.0046 and meta["Sources"] == [f"bids:raw:{t1_rel}"]
        assert meta["DefaceSeed"] == int(RUN_OPTIONS[RUN_OPTIONS.index("--seed") + 1])
        face = np.asarray(nib.load(out / f"{folder}/{prefix}_desc-face_dseg.nii.gz").dataobj)
        xmask = np.asarray(nib.load(out / f"{folder}/{prefix}_desc-exclusion_mask.nii.gz").dataobj)
        face_t2 = np.asarray(nib.load(out / f"{folder}/{prefix}_desc-faceT2w_dseg.nii.gz").dataobj)
        assert set(np.unique(face)) == {0, 1, 3}  # the labels of the .tsv beside it
        changed_t1, changed_t2 = _changed(t1, t1_out), _changed(t2, t2_out)
        # the face was replaced, only inside the face mask, never in the exclusion mask nor in
        # the independent brain mask
        assert changed_t1.sum() > 0.5 * np.count_nonzero(face)
        assert not np.any(changed_t1 & (face == 0))
        assert np.count_nonzero(changed_t1 & (xmask > 0)) == 0
        # the T1w is a copy of the head: its mask may already be cached by test_apply
        brain = independent_brain_mask(str(HEADS_DIR / head))
        assert brain.sum() > 10_000 and np.count_nonzero(changed_t1 & brain) == 0
        # the T2w: changed only under its own face mask, never in the T1w's brain carried over
        assert changed_t2.sum() > 0.5 * np.count_nonzero(face_t2)
        assert not np.any(changed_t2 & (face_t2 == 0))
        brain_t2 = apply.resample_protection(brain, t1.affine, t2.shape, t2.affine, known[t2_rel])
        assert brain_t2.sum() > 10_000 and np.count_nonzero(changed_t2 & brain_t2) == 0


def test_published_face_mask_holds_no_face_and_still_applies(reference, tmp_path):
    """The published face masks had the tissue/air labels of ``face.mask``, which agree with
    the original head mask in every voxel of the replaced region: the derivatives gave the
    face back. They now hold the two sides of the template face; ``mideface --apply`` splits
    them at the image's own head and gives the published defaced T1w again, byte for byte."""
    _, bids_dir, out = reference
    subject, _, _ = SUBJECTS[0]
    raw = bids_dir / f"sub-{subject}/anat/sub-{subject}_T1w.nii.gz"
    published = out / f"sub-{subject}/anat/sub-{subject}_desc-defaced_T1w.nii.gz"
    dseg = out / f"sub-{subject}/anat/sub-{subject}_desc-face_dseg.nii.gz"
    face = np.asarray(nib.load(dseg).dataobj)
    head = np.asarray(headmask.head_mask(nib.load(raw)).dataobj) > 0
    for side in (1, 3):  # each side holds head and air alike: no label follows the skin
        assert 0.02 < head[face == side].mean() < 0.98
    applied = tmp_path / "applied.nii.gz"
    seed = RUN_OPTIONS[RUN_OPTIONS.index("--seed") + 1]
    argv = ["--apply", str(raw), str(dseg), "regheader", str(applied), "--seed", seed]
    assert mideface_cli.main(argv) == 0
    assert np.array_equal(io.stored_data(nib.load(applied)), io.stored_data(nib.load(published)))


def test_killed_run_resumes_with_identical_outputs(reference, tmp_path):
    """SIGKILL a MultiProc run once the registration of sub-01 is done; rerun; same bytes.

    Its other subject has a noise "T1w": that session fails, the command names it and exits 1,
    and sub-01 is defaced all the same.
    """
    _, bids_dir, reference_out = reference
    out, work = tmp_path / "out", tmp_path / "work"
    args = [bids_dir, out, "participant", "--participant-label", "01", NOISE_SUBJECT]
    args += [*RUN_OPTIONS, "--work-dir", work]
    done = work / "mideface_bids/sub_01/mideface_wf/register/result_register.pklz"
    cmd = [sys.executable, "-m", "mideface_nipype.cli.mideface_bids", *[str(a) for a in args]]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + KILL_WAIT_S
        while not done.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert done.exists(), "the registration never finished"
    sink = work / "mideface_bids/sub_01/mideface_wf/outputs_wf/publish/result_publish.pklz"
    assert not sink.exists()
    # killed before publishing: nothing but the dataset description, and no half files
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        ".bidsignore",
        "README.md",
        "dataset_description.json",
    ]
    finished_at = done.stat().st_mtime_ns
    rerun = run_cli(*args, check=False)
    assert rerun.returncode == 1
    errors = [ln for ln in rerun.stderr.splitlines() if ln.startswith("mideface-bids: error:")]
    assert len(errors) == 1 and f"sub-{NOISE_SUBJECT}: " in errors[0] and "no head" in errors[0]
    assert done.stat().st_mtime_ns == finished_at  # the registration was reused, not rerun
    resumed = tree(out)
    expected = {k: v for k, v in tree(reference_out).items() if not k.startswith("sub-02")}
    assert resumed.keys() == expected.keys()
    assert [k for k in resumed if resumed[k] != expected[k]] == []


#: The official BIDS validator (``bids-validator-deno``, test extra), run from this venv.
VALIDATOR = shutil.which("bids-validator-deno", path=str(Path(sys.executable).parent)) or (
    shutil.which("bids-validator-deno")
)


@pytest.mark.skipif(
    VALIDATOR is None,
    reason="bids-validator-deno not installed (pip install -e '.[test]' installs it)",
)
def test_derivatives_pass_the_bids_validator(reference):
    """0 errors, 0 warnings from the official validator, offline (its bundled schema)."""
    _, _, out = reference
    env = {k: v for k, v in os.environ.items() if k != "BIDS_SCHEMA"}  # else it downloads one
    proc = subprocess.run(
        [VALIDATOR, str(out), "--format", "json"],
        capture_output=True,
        text=True,
        env=env | {"DENO_NO_UPDATE_CHECK": "1"},
    )
    issues = json.loads(proc.stdout)["issues"]["issues"]
    found = [(i["severity"], i["code"], i.get("subCode"), i.get("location")) for i in issues]
    assert found == [], found
    assert proc.returncode == 0
    # pybids finds the defaced images by their entities, apart from the raw ones
    bids_layout = pytest.importorskip("bids", reason="pybids not installed (test extra)")
    layout = bids_layout.BIDSLayout(reference[1], derivatives=str(out))
    defaced = layout.get(scope="mideface-nipype", desc="defaced", extension=".nii.gz")
    assert sorted(Path(f.path).name for f in defaced) == [
        "sub-01_desc-defaced_T1w.nii.gz",
        "sub-01_desc-defaced_T2w.nii.gz",
        "sub-02_ses-pre_desc-defaced_T1w.nii.gz",
        "sub-02_ses-pre_desc-defaced_T2w.nii.gz",
    ]
    raw = layout.get(scope="raw", suffix="T1w", extension=".nii.gz")
    assert sorted(Path(f.path) for f in raw) == sorted(reference[1].rglob("*_T1w.nii.gz"))


def test_subject_reports_link_every_session(reference):
    _, _, out = reference
    for subject, session, _ in SUBJECTS:
        label = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        page = (out / f"sub-{subject}.html").read_text()
        figures = out / f"sub-{subject}" / bids.FIGURES_DIR
        # the session's report, linked; every picture of --pics and the segmentation, shown
        assert f'href="sub-{subject}/figures/{label}_report.html"' in page
        assert (figures / f"{label}_report.html").read_text().startswith("<!DOCTYPE html>")
        names = [*report.PICTURES, bids.SEGMENTATION_PICTURE]
        for name in names:
            assert (figures / f"{label}_{name}").is_file()
            assert f'src="sub-{subject}/figures/{label}_{name}"' in page
        assert "grey matter" in page and "inward_tissue" in page  # the legends
        # the segmentation picture draws its own legend: a swatch of each label colour
        picture = np.asarray(Image.open(figures / f"{label}_{bids.SEGMENTATION_PICTURE}"))
        bottom = picture[-picture.shape[0] // 4 :].reshape(-1, 3)
        for colour in slices.LABEL_COLOURS[1:]:
            assert (bottom == colour).all(axis=1).any(), colour


def _engine_inputs(tmp_path: Path, *options: str):
    """The graph ``mideface-bids`` builds for ``options`` on a small dataset (not run)."""
    root = tmp_path / "ds"
    if not root.exists():
        _small_dataset(root)
    args = bids_cli.build_parser().parse_args(
        [str(root), str(tmp_path / "out"), "participant", *options]
    )
    sessions = bids.discover(root)
    workflow = bids_cli.build_workflow(args, sessions, root, tmp_path / "out")
    return sessions, workflow


def test_every_engine_option_reaches_the_graph(tmp_path):
    """Each ``mideface`` option of ``mideface-bids`` lands on the node that uses it."""
    root = _small_dataset(tmp_path / "ds")
    masks, regs = tmp_path / "masks", tmp_path / "regs"
    for session in bids.discover(root):
        _volume(masks / bids.exclusion_mask_name(session.reference), 5)
        matrix = regs / bids.transform_name(session.reference)
        matrix.parent.mkdir(parents=True, exist_ok=True)
        matrix.write_text("1 0 0 2\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    atlas = tmp_path / "atlas"
    atlas.mkdir()
    shutil.copy(atlas_dir() / META_FILE, atlas)  # the methods text reads what the atlas declares
    options = ["--back-of-head", "--forehead", "--no-ears", "--fill-const", "5", "7"]
    options += ["--ripple", "2", "40", "--statframe", "0", "--seed", "9", "--regheader"]
    options += ["--atlas", str(atlas), "--xmask", str(masks), "--init-reg", str(regs), "--pics"]
    sessions, workflow = _engine_inputs(tmp_path, *options)
    for session in sessions:
        node = f"{session.name}.mideface_wf"
        bracket = workflow.get_node(f"{node}.bracket").inputs
        assert (bracket.back_of_head, bracket.forehead, bracket.ears) == (True, True, False)
        assert (bracket.ripple, bracket.ripple_amp_mm, bracket.ripple_period_mm) == (True, 2, 40)
        assert bracket.atlas_dir == str(atlas)
        assert workflow.get_node(f"{node}.register").inputs.atlas_dir == str(atlas)
        deface = workflow.get_node(f"{node}.deface").inputs
        assert (deface.fill_const, deface.seed, deface.stat_frame) == ((5.0, 7.0), 9, 0)
        inputs = workflow.get_node(f"{node}.inputnode").inputs
        assert inputs.xmask == str(masks.resolve() / bids.exclusion_mask_name(session.reference))
        assert inputs.init_transform == str(regs.resolve() / bids.transform_name(session.reference))
        assert workflow.get_node(f"{node}.pics") is not None  # --pics
        assert workflow.get_node(f"{node}.segment") is None  # the user's exclusion mask
        sidecar = bids.sidecar_path(bids.defaced_name(session.reference))
        texts = workflow.get_node(f"{node}.outputs_wf.publish").inputs.texts
        assert json.loads(texts[str(tmp_path.resolve() / "out" / sidecar)])["DefaceSeed"] == 9
        if session.others:
            apply_mask = workflow.get_node(f"{node}.apply_mask").inputs
            assert (apply_mask.fill_const, apply_mask.seed) == ((5.0, 7.0), 9)
            assert workflow.get_node(f"{node}.coregister").inputs.regheader is True
    # the defaults, --fill-zero, a bare --ripple, --no-samseg
    sessions, workflow = _engine_inputs(tmp_path, "--fill-zero", "--ripple", "--no-samseg")
    node = f"{sessions[0].name}.mideface_wf"
    bracket = workflow.get_node(f"{node}.bracket").inputs
    assert (bracket.back_of_head, bracket.ripple, bracket.ripple_amp_mm) == (False, True, 1.5)
    assert workflow.get_node(f"{node}.deface").inputs.fill_const == (0.0, 0.0)
    assert workflow.get_node(f"{node}.exclusion") is not None
    assert workflow.get_node(f"{node}.pics") is None
    sessions, workflow = _engine_inputs(tmp_path)
    assert workflow.get_node(f"{sessions[0].name}.mideface_wf.segment") is not None
    # refused before any work, one line naming the file or option
    missing = regs / bids.transform_name(sessions[1].reference)
    missing.unlink()
    with pytest.raises(io.InputError, match=f"{missing}: not found"):
        _engine_inputs(tmp_path, "--init-reg", str(regs))
    _volume(masks / bids.exclusion_mask_name(sessions[0].reference)).write_bytes(b"")
    with pytest.raises(io.InputError, match="sub-01_desc-exclusion_mask.nii.gz: "):
        _engine_inputs(tmp_path, "--xmask", str(masks))
    with pytest.raises(io.InputError, match="--ripple takes AMP and PERIOD at most, not 3"):
        _engine_inputs(tmp_path, "--ripple", "1", "2", "3")
    with pytest.raises(io.InputError, match="nowhere: atlas folder not found"):
        _engine_inputs(tmp_path, "--atlas", "nowhere")


def test_cli_filter_file_and_options_refused_in_one_line(tmp_path, capsys):
    root = _small_dataset(tmp_path / "ds")
    out, work = tmp_path / "out", tmp_path / "w"
    filters = tmp_path / "filters.json"
    filters.write_text('{"t1w": {"session": "nope"}}')
    base = [str(root), str(out), "participant", "-w", str(work)]
    assert bids_cli.main([*base, "--bids-filter-file", str(filters)]) == 1
    err = capsys.readouterr().err
    assert f"mideface-bids: error: {root}: no T1w image found" in err
    assert bids_cli.main([*base, "--ripple", "1", "2", "3"]) == 1
    assert "--ripple takes AMP and PERIOD at most" in capsys.readouterr().err
    assert not out.exists()
