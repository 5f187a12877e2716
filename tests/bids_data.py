"""A small synthetic BIDS dataset made from the real heads, and one reference run of it.

Shared by test_bids.py and test_slurm.py: the MultiProc run made here is what the SLURM runs and
the resumed run must reproduce byte for byte.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import runcache
from conftest import FACE_HEADS, HEADS_DIR
from test_apply import make_second_contrast

#: The dataset: (subject, session or None, the real head used as its T1w).
SUBJECTS = (("01", None, FACE_HEADS[0]), ("02", "pre", FACE_HEADS[1]))
#: A subject whose "T1w" is noise: its session fails (no head) while the others go on.
NOISE_SUBJECT = "03"
#: Metadata in a top-level sidecar that every T1w inherits.
TOP_T1W_META = {"MagneticFieldStrength": 3, "Manufacturer": "Philips"}
#: Where a reference run keeps the known T2w mm -> T1w mm matrices (outside the dataset).
TRUTH_FILE = "t2w_to_t1w.json"
#: Options of the reference run: the segmentation exclusion mask (brain, skull, eyes), named
#: explicitly (the atlas-only mask let 51 brain voxels of IXI012 change, 2026-11-26).
RUN_OPTIONS = ("--samseg", "--pics", "--seed", "7", "--plugin", "MultiProc", "--nprocs", "2")
#: The raw dataset's description: what a derivative carries over (licence, authors, DOI).
DESCRIPTION = {
    "Name": "synthetic heads",
    "BIDSVersion": "1.9.0",
    "License": "CC0",
    "Authors": ["IXI project", "mideface-nipype tests"],
    "DatasetDOI": "doi:10.0000/mideface.test",
}


def make_dataset(root: Path) -> dict[str, list]:
    """Two subjects (the second with a session), each a real T1w and a synthetic T2w of it, and
    a third whose T1w is noise.

    Returns {T2w path relative to ``root``: its known 4x4 mm -> T1w mm matrix (nested lists)}.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(DESCRIPTION))
    (root / "T1w.json").write_text(json.dumps(TOP_T1W_META))
    truth = {}
    for subject, session, head in SUBJECTS:
        prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        anat = root / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
        anat.mkdir(parents=True)
        shutil.copyfile(HEADS_DIR / head, anat / f"{prefix}_T1w.nii.gz")
        (anat / f"{prefix}_T1w.json").write_text(json.dumps({"EchoTime": 0.0046}))
        t2w = anat / f"{prefix}_T2w.nii.gz"
        truth[str(t2w.relative_to(root))] = make_second_contrast(HEADS_DIR / head, t2w).tolist()
    noise = np.random.default_rng(3).normal(100, 10, (40, 40, 40)).astype(np.float32)
    anat = root / f"sub-{NOISE_SUBJECT}" / "anat"
    anat.mkdir(parents=True)
    nib.save(
        nib.Nifti1Image(noise, np.diag([4.0, 4.0, 4.0, 1.0])),
        anat / f"sub-{NOISE_SUBJECT}_T1w.nii.gz",
    )
    return truth


def run_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    """``mideface-bids`` as a whole process (as users and SLURM jobs see it)."""
    cmd = [sys.executable, "-m", "mideface_nipype.cli.mideface_bids", *[str(a) for a in args]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def reference_run() -> tuple[Path, Path, Path]:
    """(base, BIDS dir, derivatives) of one MultiProc run of ``SUBJECTS``, made once per session
    for test_bids and test_slurm, whichever xdist worker asks first (``runcache``; read-only).

    Keyed by the heads, ``RUN_OPTIONS`` and this file and ``test_apply.py`` (which make the
    dataset), besides the code version.
    """

    def build(base: Path) -> None:
        truth = make_dataset(base / "bids")
        labels = ["--participant-label", *(subject for subject, _, _ in SUBJECTS)]
        with tempfile.TemporaryDirectory(prefix="bids-reference-work-") as work:
            run_cli(
                base / "bids",
                base / "multiproc",
                "participant",
                *labels,
                *RUN_OPTIONS,
                "--work-dir",
                work,
            )
        (base / TRUTH_FILE).write_text(json.dumps(truth))

    heads = [HEADS_DIR / head for _, _, head in SUBJECTS]
    helpers = [Path(__file__), Path(__file__).with_name("test_apply.py")]
    base = runcache.cached_dir(
        "bids_reference", runcache.key("bids_reference", heads, RUN_OPTIONS, helpers), build
    )
    return base, base / "bids", base / "multiproc"


def truth(base: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in json.loads((base / TRUTH_FILE).read_text()).items()}


#: Files of a run that differ between two runs of the same data: each session's report says
#: when it was made and how long each step took.
TIMED_FILES = "sub-*/figures/*_report.html"


def tree(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under ``root`` but the ``TIMED_FILES``, and without
    ``DatasetLinks`` in the description (the raw dataset's path relative to ``root``)."""
    timed = set(root.glob(TIMED_FILES))
    files = {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p not in timed
    }
    if "dataset_description.json" in files:
        description = json.loads(files["dataset_description.json"])
        description.pop("DatasetLinks", None)
        files["dataset_description.json"] = json.dumps(description).encode()
    return files


#: Slab thickness (voxels of the real head) of ``thick_head``: 108 mm of the head in 18 slabs.
THICK_SLAB_VOXELS = 6


def thick_head(head: str, dst: Path) -> Path:
    """A real head re-sliced into 18 thick slabs (12 mm) along its first axis and padded to
    18 x 120 x 120: a whole head the engine defaces in ~20 s, on which the 20-voxel provenance
    code cannot run along the first axis (the second in-place run of issue 15)."""
    img = nib.load(HEADS_DIR / head)
    data = np.asanyarray(img.dataobj.get_unscaled())
    n = 18 * THICK_SLAB_VOXELS
    start = (data.shape[0] - n) // 2
    slabs = data[start : start + n].reshape(18, THICK_SLAB_VOXELS, *data.shape[1:]).mean(axis=1)
    pad = (120 - data.shape[2]) // 2
    slabs = np.pad(slabs, ((0, 0), (0, 0), (pad, 120 - data.shape[2] - pad)))
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, 0] * (start + (THICK_SLAB_VOXELS - 1) / 2) - affine[:3, 2] * pad
    affine[:3, 0] *= THICK_SLAB_VOXELS
    out = nib.Nifti1Image(np.rint(slabs).astype(data.dtype), affine, img.header)
    out.header.set_slope_inter(img.dataobj.slope, img.dataobj.inter)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, dst)
    return dst
