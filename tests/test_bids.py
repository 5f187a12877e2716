"""``mideface-bids``: dataset discovery, BIDS-derivative outputs, MultiProc, kill and resume."""

from __future__ import annotations

import hashlib
import json
import os
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

from mideface_nipype import apply, bids, bids_cli, fill, io

#: Seconds the kill test waits for the first subject's registration to finish.
KILL_WAIT_S = 180


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "bids_reference"
    bids_dir, out = reference_run(base)
    return base, bids_dir, out


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
    (root / "dataset_description.json").unlink()
    with pytest.raises(io.InputError, match="not a BIDS dataset"):
        bids.discover(root)


def test_derivative_names_and_sidecar_inheritance(tmp_path):
    assert bids.face_mask_name("sub-01/anat/sub-01_T1w.nii.gz", reference=True) == (
        "sub-01/anat/sub-01_desc-face_mask.nii.gz"
    )
    assert bids.face_mask_name("sub-01/ses-1/anat/sub-01_ses-1_acq-x_T2w.nii", reference=False) == (
        "sub-01/ses-1/anat/sub-01_ses-1_acq-x_desc-faceT2w_mask.nii.gz"
    )
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

    def write(**kwargs):
        return bids.write_session_outputs(
            bids_dir=root,
            output_dir=out,
            reference=session.reference,
            others=list(session.others),
            defaced=str(results[session.reference]),
            face_mask=str(mask),
            exclusion_mask=str(mask),
            other_defaced=[str(results[r]) for r in session.others],
            other_face_masks=[str(mask)] * len(session.others),
            **kwargs,
        )

    # a copy that dies half way leaves neither the target nor its temporary file
    def broken_copy(src, dst):
        Path(dst).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(io.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        write()
    monkeypatch.undo()
    assert [p for p in out.rglob("*") if p.is_file()] == []  # sidecars written before: removed
    # a temporary file left by a killed run is cleared when its target is written
    stale = out / "sub-01/anat/.sub-01_T1w.nii.gz.abc123"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half")
    written = write()
    assert not stale.exists()
    assert (out / session.reference).read_bytes() == results[session.reference].read_bytes()
    assert (out / "sub-01/anat/sub-01_desc-faceFLAIR_mask.nii.gz").exists()
    assert (out / "sub-01/anat/sub-01_acq-fast_desc-faceT2w_mask.nii.gz").exists()
    assert all(Path(p).is_file() for p in written) and len(written) == 3 * 4 + 2
    assert sorted(written) == sorted(
        map(str, bids.expected_outputs(session, root, out, in_place=False))
    )
    sidecar = json.loads((out / "sub-01/anat/sub-01_T1w.json").read_text())
    assert sidecar["EchoTime"] == 0.003
    assert sidecar["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    assert (
        json.loads((out / "sub-01/anat/sub-01_desc-face_mask.json").read_text())["Type"] == "Face"
    )

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
    written = bids.write_session_outputs(
        bids_dir=root,
        output_dir=out2,
        reference=session.reference,
        others=list(session.others),
        defaced=str(results[session.reference]),
        face_mask=str(mask),
        exclusion_mask=str(mask),
        other_defaced=[str(results[r]) for r in session.others],
        other_face_masks=[str(mask)] * len(session.others),
        in_place=True,
    )
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
    with caplog.at_level("INFO", logger="mideface"):
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
    known = truth(base)
    for subject, session, head in SUBJECTS:
        folder = f"sub-{subject}" + (f"/ses-{session}" if session else "") + "/anat"
        prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        t1_rel, t2_rel = f"{folder}/{prefix}_T1w.nii.gz", f"{folder}/{prefix}_T2w.nii.gz"
        t1, t2 = nib.load(bids_dir / t1_rel), nib.load(bids_dir / t2_rel)
        t1_out, t2_out = nib.load(out / t1_rel), nib.load(out / t2_rel)
        for before, after in ((t1, t1_out), (t2, t2_out)):
            assert after.shape == before.shape and np.allclose(after.affine, before.affine)
            assert after.get_data_dtype() == before.get_data_dtype()
            assert fill.check_code(io.stored_data(after))
        meta = json.loads((out / f"{folder}/{prefix}_T1w.json").read_text())
        assert meta["MagneticFieldStrength"] == TOP_T1W_META["MagneticFieldStrength"]
        assert meta["EchoTime"] == 0.0046 and meta["Sources"] == [f"bids:raw:{t1_rel}"]
        assert meta["DefaceSeed"] == int(RUN_OPTIONS[RUN_OPTIONS.index("--seed") + 1])
        face = np.asarray(nib.load(out / f"{folder}/{prefix}_desc-face_mask.nii.gz").dataobj)
        xmask = np.asarray(nib.load(out / f"{folder}/{prefix}_desc-exclusion_mask.nii.gz").dataobj)
        face_t2 = np.asarray(nib.load(out / f"{folder}/{prefix}_desc-faceT2w_mask.nii.gz").dataobj)
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
    cmd = [sys.executable, "-m", "mideface_nipype.bids_cli", *[str(a) for a in args]]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + KILL_WAIT_S
        while not done.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert done.exists(), "the registration never finished"
    assert not (work / "mideface_bids/sub_01/derivatives/result_derivatives.pklz").exists()
    # killed before publishing: nothing but the dataset description, and no half files
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["dataset_description.json"]
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
