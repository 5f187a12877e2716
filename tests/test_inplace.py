"""``mideface-bids --in-place`` and the dataset checks of issue 15 ("Nothing lost").

Real heads re-sliced to 18 x 120 x 120 (``bids_data.thick_head``: the provenance code cannot run
along their first axis) keep the engine at ~20 s a head; the engine runs twice in this module
(one head each), every other run reuses Nipype's cache (content hashes) or stops before the
engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from bids_data import thick_head

from mideface_nipype.engine import fill
from mideface_nipype.utils import bids, io

#: Every test here runs the engine on real heads (or needs a run that does).
pytestmark = pytest.mark.slow

#: Options of every engine run here: the science is not the point.
OPTIONS = ("--no-samseg", "--plugin", "Linear", "--seed", "7")
#: The raw files' mode: not what the umask (022) gives a new file, so a kept mode shows.
RAW_MODE = 0o640
T1W = "sub-01/anat/sub-01_T1w.nii.gz"
SIDECAR = "sub-01/anat/sub-01_T1w.json"
MANIFEST = f"{bids.ORIGINALS_DIR}/{bids.MANIFEST_NAME}"
#: The first raw T1w, and another person's scan that replaces it (whose 18-slab version the
#: engine places; IXI013's is refused by the pose check).
HEADS = {"a": "IXI012-HH-1211-T1_ds.nii.gz", "b": "IXI014-HH-1236-T1_ds.nii.gz"}

#: ``mideface-bids`` under umask 022, with Nipype hashing file contents (a rerun's kept copy is
#: rewritten with the same bytes: its cached engine results are reused) and a SIGKILL of itself
#: during or after the KILL_AT-th file written under the KILL_WATCH folders; the number of such
#: writes goes to COUNT_FILE.
RUNNER = """
import os, signal, sys
from contextlib import contextmanager
from pathlib import Path

os.umask(0o022)
from nipype import config

config.set("execution", "hash_method", "content")
from mideface_nipype.cli import mideface_bids as bids_cli
from mideface_nipype.utils import io

kill_at = int(os.environ.get("KILL_AT", "0"))
when = os.environ.get("KILL_WHEN", "after")
watched = [str(Path(p).resolve()) + os.sep for p in os.environ["KILL_WATCH"].split(os.pathsep)]
atomic_path = io.atomic_path
count = 0


def tick(now):
    global count
    if now:
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def counted(path, **kwargs):
    mine = str(Path(path).resolve()).startswith(tuple(watched))
    with atomic_path(path, **kwargs) as tmp:
        yield tmp
        tick(mine and when == "during")
    tick(mine and when == "after")


io.atomic_path = counted
code = bids_cli.main(sys.argv[1:])
Path(os.environ["COUNT_FILE"]).write_text(str(count))
sys.exit(code)
"""


def run(ds: Path, out: Path, work: Path, *extra, kill_at: int = 0, when: str = "after"):
    env = os.environ | {
        "KILL_AT": str(kill_at),
        "KILL_WHEN": when,
        "KILL_WATCH": os.pathsep.join([str(ds), str(out)]),
        "COUNT_FILE": str(work.parent / "count.txt"),
    }
    args = [str(ds), str(out), "participant", *OPTIONS, "--work-dir", str(work), *extra]
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=work.parent,
    )
    proc.count = int((work.parent / "count.txt").read_text()) if proc.returncode >= 0 else None
    return proc


def errors(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("mideface-bids: error:")]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (md5, mode)} of every file under ``root``, hidden ones included."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (
            hashlib.md5(p.read_bytes()).hexdigest(),
            p.stat().st_mode & 0o7777,
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def copy_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes an exact copy of ``src`` (bytes and modes)."""
    shutil.rmtree(dst, ignore_errors=True)
    if src.exists():
        shutil.copytree(src, dst)


def make_dataset(root: Path, t1w: Path, name: str = "thick heads") -> Path:
    """One subject whose T1w (mode 0640, with a sidecar) is ``t1w``."""
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": name}))
    shutil.copyfile(t1w, root / T1W)
    (root / SIDECAR).write_text(json.dumps({"EchoTime": 0.0046}))
    for rel in (T1W, SIDECAR):
        os.chmod(root / rel, RAW_MODE)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two in-place runs on the same paths: a fresh dataset, then after its raw T1w was
    replaced by another person's scan. Each state is kept (as folders) for the other tests."""
    base = tmp_path_factory.mktemp("inplace")
    heads = {key: thick_head(head, base / "heads" / f"{key}.nii.gz") for key, head in HEADS.items()}
    ds, out = base / "ds", base / "out"
    make_dataset(ds, heads["a"])
    states = base / "states"
    copy_tree(ds, states / "fresh" / "ds")
    first = run(ds, out, base / "work-a", "--in-place")
    assert first.returncode == 0, first.stderr[-3000:]
    copy_tree(ds, states / "a" / "ds")
    copy_tree(out, states / "a" / "out")
    shutil.copyfile(heads["b"], ds / T1W)  # keeps the raw file's mode
    copy_tree(ds, states / "new" / "ds")
    copy_tree(out, states / "new" / "out")
    second = run(ds, out, base / "work-b", "--in-place")
    assert second.returncode == 0, second.stderr[-3000:]
    copy_tree(ds, states / "b" / "ds")
    copy_tree(out, states / "b" / "out")
    return SimpleNamespace(
        base=base, ds=ds, out=out, heads=heads, states=states, first=first, second=second
    )


def restore(runs, state: str) -> None:
    """Put ``runs.ds`` and ``runs.out`` back into a kept state."""
    copy_tree(runs.states / state / "ds", runs.ds)
    copy_tree(runs.states / state / "out", runs.out)


def sha(path: Path) -> str:
    return bids.sha256(path)


def test_in_place_keeps_the_original_its_mode_and_checksums(runs):
    a = runs.states / "a"
    raw, kept = a / "ds" / T1W, a / "out" / bids.ORIGINALS_DIR / T1W
    img, original = nib.load(raw), nib.load(runs.heads["a"])
    assert img.shape == (18, 120, 120)
    assert kept.read_bytes() == runs.heads["a"].read_bytes()
    # defaced, with the provenance code on the second axis (the first has 18 voxels) and the
    # descrip stamp; same dtype and scaling
    data = io.stored_data(img)
    assert fill.check_code(data) and not fill.check_code(io.stored_data(original))
    stats = json.loads(next((runs.base / "work-a").rglob("stats.json")).read_text())
    assert stats["fill"]["code_location"] == fill.code_location(img.shape)
    assert stats["fill"]["code_location"]["axis_order"][0] == 1
    assert img.header["descrip"].item().decode().startswith("defaced by mideface-nipype")
    assert img.get_data_dtype() == original.get_data_dtype()
    assert img.dataobj.slope == original.dataobj.slope
    changed = data != io.stored_data(original)
    assert changed.sum() > 1000
    manifest = json.loads((a / "out" / MANIFEST).read_text())
    assert manifest["dataset"]["path"] == str(runs.ds.resolve())
    assert manifest["dataset"]["name"] == "thick heads"
    assert manifest["images"][T1W] == {
        "original_sha256": sha(runs.heads["a"]),
        "defaced_sha256": sha(raw),
    }
    # modes: raw and kept files keep the raw file's; new derivative files get the umask's
    ds_files, out_files = snapshot(a / "ds"), snapshot(a / "out")
    assert ds_files[T1W][1] == RAW_MODE and ds_files[SIDECAR][1] == RAW_MODE
    assert out_files[f"{bids.ORIGINALS_DIR}/{T1W}"][1] == RAW_MODE
    assert out_files[f"{bids.ORIGINALS_DIR}/{SIDECAR}"][1] == RAW_MODE
    masks = [k for k in out_files if "desc-" in k]  # face dseg (+ .tsv, .json), exclusion mask
    assert len(masks) == 5 and all(out_files[k][1] == 0o644 for k in masks)
    assert (a / "ds" / SIDECAR).read_text() == json.dumps({"EchoTime": 0.0046})
    hidden = [k for k in {**ds_files, **out_files} if Path(k).name.startswith(".")]
    assert hidden == [".bidsignore"]  # the derivative's own, for its reports


def test_second_in_place_run_changes_nothing(runs):
    """Issue 15, case 3: rerun on the defaced 18 x 120 x 120 image: skipped, nothing written."""
    restore(runs, "a")
    before = (snapshot(runs.ds), snapshot(runs.out))
    mtimes = {p: p.stat().st_mtime_ns for p in [*runs.ds.rglob("*"), *runs.out.rglob("*")]}
    proc = run(runs.ds, runs.out, runs.base / "work-a", "--in-place")
    assert proc.returncode == 0, proc.stderr
    skipped = [ln for ln in proc.stderr.splitlines() if "skipped" in ln]
    assert len(skipped) == 1 and f"{T1W}: already defaced in place" in skipped[0]
    assert "nothing to deface" in proc.stderr
    assert (snapshot(runs.ds), snapshot(runs.out)) == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_new_raw_data_is_kept_and_defaced(runs):
    """Issue 15, case 1: the raw T1w replaced by another person's scan, then a rerun."""
    b = runs.states / "b"
    assert runs.second.returncode == 0
    raw, kept_root = b / "ds" / T1W, b / "out" / bids.ORIGINALS_DIR
    # the new scan is kept as the original, the old original is kept too, by checksum
    assert (kept_root / T1W).read_bytes() == runs.heads["b"].read_bytes()
    old = sha(runs.heads["a"])
    superseded = kept_root / bids.SUPERSEDED_DIR / old[:16] / T1W
    assert sha(superseded) == old and (superseded.stat().st_mode & 0o7777) == RAW_MODE
    assert (superseded.parent / Path(SIDECAR).name).read_bytes() == (
        b / "ds" / SIDECAR
    ).read_bytes()
    manifest = json.loads((b / "out" / MANIFEST).read_text())
    assert manifest["images"][T1W] == {
        "original_sha256": sha(runs.heads["b"]),
        "defaced_sha256": sha(raw),
        "superseded": [{"sha256": old, "path": str(superseded.relative_to(kept_root))}],
    }
    assert any("new raw data" in ln for ln in runs.second.stderr.splitlines())
    # the raw file is the new scan, defaced: not the first run's defaced head
    assert raw.read_bytes() != (runs.states / "a" / "ds" / T1W).read_bytes()
    new, scan = io.stored_data(nib.load(raw)), io.stored_data(nib.load(runs.heads["b"]))
    face = np.asarray(nib.load(b / "out" / "sub-01/anat/sub-01_desc-face_dseg.nii.gz").dataobj)
    code = fill.embed_code(np.zeros(new.shape, np.uint8)) != 0
    assert np.array_equal(new[(face == 0) & ~code], scan[(face == 0) & ~code])
    assert np.count_nonzero(new != scan) > 1000 and fill.check_code(new)
    assert (raw.stat().st_mode & 0o7777) == RAW_MODE


def test_output_folder_of_another_dataset_is_refused(runs, tmp_path):
    """Issue 15, case 1: a second dataset pointed at the same output folder."""
    restore(runs, "a")
    other = make_dataset(tmp_path / "other", runs.heads["b"], name="other heads")
    before = (snapshot(other), snapshot(runs.out))
    for extra in (["--in-place"], []):
        proc = run(other, runs.out, tmp_path / "work", *extra)
        assert proc.returncode == 1
        assert len(errors(proc)) == 1, proc.stderr
        assert errors(proc)[0].startswith(f"mideface-bids: error: {runs.out.resolve()}: ")
        assert "another dataset" in errors(proc)[0] or "derivative of" in errors(proc)[0]
        assert (snapshot(other), snapshot(runs.out)) == before
        assert not (tmp_path / "work" / "mideface_bids").exists()


@pytest.mark.parametrize(("state", "reference", "work"), [("fresh", "a", "a"), ("new", "b", "b")])
def test_killed_in_place_run_loses_nothing(runs, state, reference, work):
    """SIGKILL after (and during) every file the run writes; a rerun gives the same bytes
    and modes as an uninterrupted run, and every original is kept with its checksum."""
    work_dir = runs.base / f"work-{work}"
    writes = (runs.first if state == "fresh" else runs.second).count
    assert writes >= 8
    expected = (
        snapshot(runs.states / reference / "ds"),
        snapshot(runs.states / reference / "out"),
    )
    kills = [(n, "after") for n in range(1, writes + 1)]
    if state == "new":  # also with the temporary file written and not yet renamed
        kills += [(n, "during") for n in range(1, writes + 1)]
    for kill_at, when in kills:
        restore(runs, state)
        killed = run(runs.ds, runs.out, work_dir, "--in-place", kill_at=kill_at, when=when)
        assert killed.returncode == -signal.SIGKILL, (kill_at, when, killed.stderr[-2000:])
        # at every point, each original is still the raw file or kept in sourcedata
        kept = runs.out / bids.ORIGINALS_DIR
        copies = {sha(p) for p in [runs.ds / T1W, *kept.rglob("*.nii.gz")] if p.is_file()}
        originals = [runs.heads["a"]] if state == "fresh" else list(runs.heads.values())
        assert {sha(h) for h in originals} <= copies, (kill_at, when)
        rerun = run(runs.ds, runs.out, work_dir, "--in-place")
        assert rerun.returncode == 0, (kill_at, when, rerun.stderr[-2000:])
        assert (snapshot(runs.ds), snapshot(runs.out)) == expected, (kill_at, when)


def _variant(root: Path, head: Path, how: str) -> Path:
    """A dataset whose T1w counts as defaced already, by one mark only."""
    make_dataset(root, head)
    img = nib.load(root / T1W)
    if how == "sidecar":
        (root / SIDECAR).write_text(json.dumps({"Defacing": {"Tool": "mideface-nipype"}}))
    else:  # the same stored voxels, the stamp set (on the raw head) or cleared (defaced head)
        descrip = io.defaced_descrip() if how == "descrip" else ""
        nib.save(io.like(img, io.stored_data(img), descrip=descrip), root / T1W)
    os.chmod(root / T1W, RAW_MODE)
    return root


@pytest.mark.parametrize("how", ["descrip", "sidecar", "code"])
def test_already_defaced_image_is_skipped(runs, tmp_path, how):
    """Issue 15, case 3: an image with the code, the descrip stamp or a Defacing record, and
    no manifest, is not defaced again (nor kept as an original), in place or not."""
    head = runs.states / "a" / "ds" / T1W if how == "code" else runs.heads["a"]
    ds = _variant(tmp_path / "ds", head, how)
    assert bids.defaced_mark(ds, T1W) is not None
    before = snapshot(ds)
    for extra in (["--in-place"], []):
        out = tmp_path / f"out{len(extra)}"
        proc = run(ds, out, tmp_path / "work", *extra)
        assert proc.returncode == 0, proc.stderr
        skipped = [ln for ln in proc.stderr.splitlines() if "skipped" in ln]
        assert len(skipped) == 1 and f"{T1W}: already defaced (" in skipped[0], proc.stderr
        assert snapshot(ds) == before
        assert list(snapshot(out)) == [".bidsignore", "README.md", "dataset_description.json"]
        assert not (tmp_path / "work" / "mideface_bids").exists()
    # --force: planned for defacing again, its raw file kept first as the original
    session = bids.discover(ds)
    planned = bids.prepare_in_place(session, ds, tmp_path / "forced", force=True)
    assert [s.reference for s in planned] == [T1W]
    assert (tmp_path / "forced" / bids.ORIGINALS_DIR / T1W).read_bytes() == (ds / T1W).read_bytes()


def test_invalid_sidecar_is_refused_before_any_work(runs, tmp_path):
    """Issue 15, case 7: a broken JSON sidecar is named at once; nothing is written."""
    ds = make_dataset(tmp_path / "ds", runs.heads["a"])
    broken = ds / "sub-02" / "anat" / "sub-02_T2w.json"
    broken.parent.mkdir(parents=True)
    shutil.copyfile(runs.heads["b"], ds / "sub-02/anat/sub-02_T1w.nii.gz")
    broken.write_text('{"EchoTime": 0.1,')
    before = snapshot(ds)
    for extra in (["--in-place"], []):
        out = tmp_path / f"out{len(extra)}"
        proc = run(ds, out, tmp_path / "work", *extra)
        assert proc.returncode == 1
        assert errors(proc) == [errors(proc)[0]]
        assert errors(proc)[0].startswith(
            f"mideface-bids: error: {broken.resolve()}: unreadable JSON"
        )
        assert snapshot(ds) == before and not out.exists()
        assert not (tmp_path / "work").exists()


def test_clashing_labels_are_refused_in_one_line(runs, tmp_path):
    """Issue 15, case 8: ``sub-a-b`` next to ``sub-a_b`` (both would be node ``sub_a_b``)."""
    ds = make_dataset(tmp_path / "ds", runs.heads["a"])
    for label in ("a-b", "a_b"):
        (ds / f"sub-{label}" / "anat").mkdir(parents=True)
        shutil.copyfile(runs.heads["b"], ds / f"sub-{label}/anat/sub-{label}_T1w.nii.gz")
    before = snapshot(ds)
    proc = run(ds, tmp_path / "out", tmp_path / "work")
    assert proc.returncode == 1 and len(errors(proc)) == 1, proc.stderr
    assert errors(proc)[0] == (
        f"mideface-bids: error: {ds.resolve() / 'sub-a-b'}: 'a-b' is not a BIDS sub label "
        "(letters and digits only); rename the folder"
    )
    assert "Duplicate" not in proc.stderr
    assert snapshot(ds) == before and not (tmp_path / "out").exists()


def test_existing_outputs_are_not_overwritten_without_force(runs, tmp_path):
    ds = make_dataset(tmp_path / "ds", runs.heads["a"])
    out = tmp_path / "out"
    bids.write_dataset_description(ds, out)
    mask = out / "sub-01/anat/sub-01_desc-face_dseg.nii.gz"
    mask.parent.mkdir(parents=True)
    mask.write_bytes(b"someone's file")
    before = (snapshot(ds), snapshot(out))
    proc = run(ds, out, tmp_path / "work")
    assert proc.returncode == 1 and len(errors(proc)) == 1, proc.stderr
    assert "already exists; give --force to overwrite it" in errors(proc)[0]
    assert (snapshot(ds), snapshot(out)) == before
    assert not (tmp_path / "work" / "mideface_bids").exists()


@pytest.mark.parametrize("what", ["work", "out"])
def test_second_run_on_a_locked_folder_stops_at_once(runs, tmp_path, what):
    """Issue 15, case 6: a second run on the same work or output folder exits 1, clearly, and
    writes nothing (instead of both failing half-way)."""
    ds = make_dataset(tmp_path / "ds", runs.heads["a"])
    folders = {"work": tmp_path / "work", "out": tmp_path / "out"}
    before = snapshot(ds)
    with io.locked(folders[what], "folder"):
        proc = run(ds, folders["out"], folders["work"], "--in-place")
    assert proc.returncode == 1 and len(errors(proc)) == 1, proc.stderr
    label = {"work": "work folder", "out": "output folder"}[what]
    assert f"another mideface run is using this {label}" in errors(proc)[0]
    assert snapshot(ds) == before
    assert not (folders["out"]).exists() and not (folders["work"] / "mideface_bids").exists()
