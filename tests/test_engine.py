"""The engine end to end on real heads, through the ``mideface`` CLI and its Nipype workflow."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from brain import independent_brain_mask
from conftest import ALL_T1W_HEADS, FACE_HEADS, HEADS_DIR, default_run
from scipy import ndimage as ndi
from test_report import assert_renders_differ_in_the_face_only

from mideface_nipype.cli import mideface as cli
from mideface_nipype.engine import bracket, fill
from mideface_nipype.engine.segment import SEG_LABELS
from mideface_nipype.evaluation.metrics import rigid_part
from mideface_nipype.reports import report
from mideface_nipype.utils import io

#: Smallest mean change (mm) of the frontal skin depth over the face region after defacing.
MIN_MEAN_DEPTH_CHANGE_MM = 1.0
#: Voxels where the independent (SyN) brain mask is known to leak out of the skull: on dcmqa (its
#: strong coil shading) it reaches two voxels of nasal-cavity air at MNI (12, 68, -42) that lie
#: in face compartment 2 and that our segmentation labels air, 20 mm from any brain.
REFERENCE_LEAK_VOXELS = {"dcmqa-xa30_T1w_2mm.nii.gz": 2}
#: Largest share of the face's skin area whose defaced skin lies within 1 mm of the original
#: (the dist-to-face check) on a head with the whole face in view.
MAX_COINCIDE_FRACTION = 0.15
#: Smallest change (mm) of the skin depth at the subject's nose tip.
MIN_NOSE_TIP_CHANGE_MM = 4.0
#: Pixel (mm) of the frontal depth maps in the atlas pose on which the landmarks are found.
LANDMARK_PIXEL_MM = 2.0


@pytest.fixture(scope="session")
def runs() -> dict[str, Path]:
    """Every real T1w head defaced once per session (``--odir`` keeps the masks, ``--pics`` the
    pictures; the same runs as test_report's and test_audit's, read-only)."""
    return {name: default_run(name, "--pics") for name in ALL_T1W_HEADS}


def _skin(data: np.ndarray, threshold: float) -> np.ndarray:
    mask = ndi.binary_fill_holes(ndi.gaussian_filter(data, 1.0) > threshold)
    lab, _ = ndi.label(mask)
    return lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1


def _frontal_depth_mm(mask: np.ndarray, y_mm: float) -> np.ndarray:
    """Most anterior skin position (mm from the grid's back) of each (x, z) column; RAS grid."""
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1, :], axis=1)
    return np.where(mask.any(axis=1), last * y_mm, np.nan)


@pytest.mark.parametrize("name", ALL_T1W_HEADS)
def test_output_keeps_grid_dtype_and_scaling(runs, name):
    src = nib.load(HEADS_DIR / name)
    out = nib.load(runs[name] / "defaced.nii.gz")
    assert out.shape == src.shape
    assert np.allclose(out.affine, src.affine)
    assert out.get_data_dtype() == src.get_data_dtype()
    assert out.dataobj.slope == src.dataobj.slope and out.dataobj.inter == src.dataobj.inter
    assert out.header["descrip"].tobytes().startswith(b"defaced by mideface-nipype")
    assert fill.check_code(io.stored_data(out))
    assert not fill.check_code(io.stored_data(src))


@pytest.mark.parametrize("name", ALL_T1W_HEADS)
def test_exclusion_and_independent_brain_untouched(runs, name):
    src = io.stored_data(nib.load(HEADS_DIR / name))
    out = io.stored_data(nib.load(runs[name] / "defaced.nii.gz"))
    changed = src != out
    xmask = np.asarray(nib.load(runs[name] / "exclusion.mask.nii.gz").dataobj) > 0
    brain = independent_brain_mask(str(HEADS_DIR / name))
    assert xmask.sum() > 100_000 * (2.0 / nib.load(HEADS_DIR / name).header.get_zooms()[0]) ** -3
    assert brain.sum() > 0
    assert np.count_nonzero(changed & xmask) == 0
    assert np.count_nonzero(changed & brain) <= REFERENCE_LEAK_VOXELS.get(name, 0)
    face = np.asarray(nib.load(runs[name] / "face.mask.nii.gz").dataobj)
    # everything that changed is in the face mask, apart from the provenance code voxels
    changed[: len(fill.CODE_TAG), 0, 0] = False
    assert np.all(face[changed] > 0)


def _posed_skin(data: np.ndarray, affine: np.ndarray, pose: np.ndarray, threshold: float):
    """Outer skin voxels (i, j, k) of a head and their positions (mm) in the atlas pose."""
    skin = _skin(data, threshold)
    voxels = np.argwhere(skin & ~ndi.binary_erosion(skin))
    return voxels, nib.affines.apply_affine(pose @ affine, voxels)


def _depth_map(points: np.ndarray, origin_mm: np.ndarray) -> np.ndarray:
    """Frontal depth map in the atlas pose: per (x, z) pixel of LANDMARK_PIXEL_MM from
    ``origin_mm``, the index of the most anterior point (-1 where none)."""
    ix, iz = (np.floor((points[:, [0, 2]] - origin_mm) / LANDMARK_PIXEL_MM).astype(int)).T
    ok = (ix >= 0) & (iz >= 0) & (ix < 150) & (iz < 150)
    order = np.flatnonzero(ok)[np.argsort(points[ok, 1])]
    best = np.full((150, 150), -1)
    best[ix[order], iz[order]] = order  # written in order of depth: the most anterior wins
    return best


def _face_landmarks(points: np.ndarray, best: np.ndarray, origin_mm) -> dict[str, tuple]:
    """Pixels of the nose tip, lips, chin, and on each side the eyelid, brow and cheek, on the
    frontal depth map of a head in the atlas pose (rigid: the head keeps its proportions).

    Along the midline: the nose tip is the most anterior point, the lips the most anterior
    point below the subnasale (the deepest point under the tip), the chin the most anterior
    point 10-25 mm below the lips. On each side: the eyelid is the most anterior point over
    the eye (26-38 mm from the midline, 15-28 mm above the tip), the brow the most anterior
    point 5-12 mm above the eyelid, the cheek the skin 45 mm from the midline just below the
    tip's height.
    """
    depth = np.where(best >= 0, points[np.maximum(best, 0), 1], np.nan)
    x_mm, z_mm = origin_mm[:, None] + (np.arange(150) + 0.5) * LANDMARK_PIXEL_MM
    nearest_mm = [-np.inf]  # after the nose tip: 60 mm behind it

    def pick(x_range, z_range, side: float = 0.0, deepest: bool = False) -> tuple[int, int]:
        """Most anterior (or deepest) pixel with |x| and z (mm) in range, on one side (sign
        of x) or either (0), among pixels that see the front of the face."""
        sel_x = (np.abs(x_mm) >= x_range[0]) & (np.abs(x_mm) < x_range[1])
        if side:
            sel_x &= np.sign(x_mm) == side
        sel_z = (z_mm >= z_range[0]) & (z_mm < z_range[1])
        sel = sel_x[:, None] & sel_z[None, :] & (depth > nearest_mm[0])
        values = np.where(sel, -depth if deepest else depth, np.nan)
        assert np.isfinite(values).any(), (x_range, z_range, side)
        return np.unravel_index(np.nanargmax(values), values.shape)

    tip = pick((0, 10), (-110, -40))
    nearest_mm[0], tip_z = depth[tip] - 60, z_mm[tip[1]]
    below = z_mm[pick((0, 6), (tip_z - 25, tip_z - 4), deepest=True)[1]]
    lips = pick((0, 10), (below - 30, below - 2))
    marks = {"nose tip": tip, "lips": lips}
    marks["chin"] = pick((0, 12), (z_mm[lips[1]] - 25, z_mm[lips[1]] - 10))
    for name, side in (("right", 1.0), ("left", -1.0)):
        lid = marks[f"eyelid {name}"] = pick((26, 38), (tip_z + 15, tip_z + 28), side)
        marks[f"brow {name}"] = pick((22, 42), (z_mm[lid[1]] + 5, z_mm[lid[1]] + 12), side)
        marks[f"cheek {name}"] = pick((43, 47), (tip_z - 6, tip_z - 2), side)
    return marks


def _landmarks_and_depths(name: str, odir: Path):
    """The landmarks of the original head (subject voxels), and the depth (mm, atlas pose) of
    the original's and the defaced head's skin at each of them."""
    src = nib.load(HEADS_DIR / name)
    data, defaced = io.first_frame(src), io.first_frame(nib.load(odir / "defaced.nii.gz"))
    threshold = 0.5 * np.median(data[data > np.percentile(data, 50)])
    centre = nib.affines.apply_affine(src.affine, np.argwhere(_skin(data, threshold))).mean(0)
    pose = rigid_part(np.loadtxt(odir / "subject_to_atlas.txt"), centre)
    voxels, points = _posed_skin(data, src.affine, pose, threshold)
    origin_mm = np.floor(points[:, [0, 2]].min(0))
    best = _depth_map(points, origin_mm)
    marks = _face_landmarks(points, best, origin_mm)
    _, after_points = _posed_skin(defaced, src.affine, pose, threshold)
    after = _depth_map(after_points, origin_mm)
    out = {}
    for label, pixel in marks.items():
        after_mm = after_points[after[pixel], 1] if after[pixel] >= 0 else -np.inf
        out[label] = (tuple(voxels[best[pixel]]), points[best[pixel], 1], after_mm)
    return out


def _in_face_mask(face: np.ndarray, voxel: tuple) -> bool:
    """The face mask holds the voxel or one of its 26 neighbours (the landmarks are found on
    depth-map pixels as large as the voxels of these heads: one voxel is their precision)."""
    lo = np.maximum(np.asarray(voxel) - 1, 0)
    return bool(face[lo[0] : voxel[0] + 2, lo[1] : voxel[1] + 2, lo[2] : voxel[2] + 2].any())


@pytest.mark.parametrize("name", FACE_HEADS)
def test_face_landmarks_are_replaced(runs, name):
    """Nose tip, lips, eyelids, brows and cheeks (found on the original's skin) lie in the
    face mask; the skin at the nose tip moves by at least MIN_NOSE_TIP_CHANGE_MM."""
    face = np.asarray(nib.load(runs[name] / "face.mask.nii.gz").dataobj)
    marks = _landmarks_and_depths(name, runs[name])
    assert len(marks) == 9
    for label, (voxel, _, _) in marks.items():
        if label != "chin":
            assert _in_face_mask(face, voxel), f"{label} at voxel {voxel} is not in the face mask"
    _, before_mm, after_mm = marks["nose tip"]
    assert abs(before_mm - after_mm) >= MIN_NOSE_TIP_CHANGE_MM, (before_mm, after_mm)


@pytest.mark.parametrize("name", FACE_HEADS)
def test_chin_is_replaced(runs, name):
    """The chin (found on the original) lies in the face mask, also where the atlas registration
    puts it below the average chin (IXI033 and dcmqa: atlas z -146 and -144, below the neck's
    cut at -136)."""
    face = np.asarray(nib.load(runs[name] / "face.mask.nii.gz").dataobj)
    voxel = _landmarks_and_depths(name, runs[name])["chin"][0]
    assert _in_face_mask(face, voxel), f"chin at voxel {voxel} is not in the face mask"


@pytest.mark.parametrize("name", FACE_HEADS)
def test_little_true_skin_left_and_no_seams(runs, name):
    """The defaced skin leaves at most MAX_COINCIDE_FRACTION of the face's skin in place, and
    the bracketing bounds step by at most bracket.MAX_BOUND_STEP_MM between neighbours."""
    import json

    stats = json.loads((runs[name] / "stats.json").read_text())
    check = stats["pics"]["dist_to_face"]
    assert check["face_area_mm2"] > 20_000
    assert check["coincide_fraction"] <= MAX_COINCIDE_FRACTION, check
    blended = stats["bracket"]["blended_bounds"]
    assert 0 < blended["max_step_mm"] <= bracket.MAX_BOUND_STEP_MM, blended
    assert blended["sigma_mm"] == bracket.BLEND_SIGMA_MM


@pytest.mark.parametrize("name", FACE_HEADS)
def test_skin_surface_no_longer_the_subjects(runs, name):
    """The frontal skin depth map changes over the face (at the nose tip: see
    test_face_landmarks_are_replaced)."""
    src = nib.as_closest_canonical(nib.load(HEADS_DIR / name))
    out = nib.as_closest_canonical(nib.load(runs[name] / "defaced.nii.gz"))
    face = np.asarray(nib.as_closest_canonical(nib.load(runs[name] / "face.mask.nii.gz")).dataobj)
    a, b = io.first_frame(src), io.first_frame(out)
    zooms = src.header.get_zooms()
    threshold = 0.5 * np.median(a[a > np.percentile(a, 50)])
    depth_a = _frontal_depth_mm(_skin(a, threshold), zooms[1])
    depth_b = _frontal_depth_mm(_skin(b, threshold), zooms[1])
    region = (face > 0).any(axis=1)
    diff = np.abs(depth_a - depth_b)[region]
    assert np.nanmean(diff) >= MIN_MEAN_DEPTH_CHANGE_MM


@pytest.mark.parametrize("name", ALL_T1W_HEADS)
def test_pictures_show_the_face_changed_and_the_back_of_the_head_not(runs, name):
    """--pics on every head: all pictures and report.html written; the renders change in the
    face only (the pictures were also looked at: a face before, none after)."""
    odir = runs[name]
    for picture in [*report.PICTURES, "report.html"]:
        assert (odir / picture).stat().st_size > 20_000, picture
    assert_renders_differ_in_the_face_only(HEADS_DIR / name, odir)


def test_odir_outputs_and_stats(runs):
    import json

    odir = runs["dcmqa-xa30_T1w_2mm.nii.gz"]
    for name in (
        "defaced.nii.gz",
        "face.mask.nii.gz",
        "head.mask.nii.gz",
        "exclusion.mask.nii.gz",
        "subject_to_atlas.txt",
        "subject_to_atlas.mat",
        "template.surf.gii",
        "distances.json",
        "stats.json",
        "log/mideface.log",
        "seg.nii.gz",
        "segmentation.png",
    ):
        assert (odir / name).is_file(), name
    stats = json.loads((odir / "stats.json").read_text())
    # by default the exclusion mask comes from this head's segmentation: brain, skull and eyes
    assert stats["exclusion"]["method"] == "segment"
    assert 1000 < stats["exclusion"]["icv_ml"] < 2200
    xmask = np.asarray(nib.load(odir / "exclusion.mask.nii.gz").dataobj) > 0
    seg = np.asarray(nib.load(odir / "seg.nii.gz").dataobj)
    assert np.all(xmask[seg == SEG_LABELS["bone"]]) and np.all(xmask[seg == SEG_LABELS["eyes"]])
    face = np.asarray(nib.load(odir / "face.mask.nii.gz").dataobj)
    counts = stats["bracket"]["compartment_voxels"]
    for k in range(1, 5):
        assert counts[str(k)] == np.count_nonzero(face == k) > 0
    for label in ("lower-face", "upper-face", "nose", "eyes", "ear-left", "ear-right"):
        entry = stats["bracket"]["labels"][label]
        assert 2.0 <= entry["dist_in_mm"] <= 20.0
        assert 2.0 <= entry["dist_out_mm"] <= 100.0
    assert stats["registration"]["head_dice"] > 0.8
    assert stats["fill"]["n1"] == counts["1"]
    assert set(np.unique(face)) <= {0, 1, 2, 3, 4}


def test_same_seed_same_bytes_other_seed_differs(tmp_path, fresh_registrations):
    """Two whole runs with the same seed (every registration runs: repeatable), then another
    seed in the second run's Nipype work folder: only the fill and the nodes after it run again."""
    src = str(HEADS_DIR / "dcmqa-xa30_T1w_2mm.nii.gz")
    work = tmp_path / "work"
    outs = []
    runs = (("53", []), ("53", ["--work-dir", work]), ("7", ["--work-dir", work]))
    for i, (seed, work_dir) in enumerate(runs):
        out = tmp_path / f"out{i}.nii.gz"
        argv = ["--i", src, "--o", out, "--seed", seed, *work_dir]
        assert cli.main([str(a) for a in argv]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_fill_const_and_mgz_output(tmp_path):
    src = HEADS_DIR / "IXI014-HH-1236-T1_ds.nii.gz"
    out = tmp_path / "defaced.mgz"
    facemask = tmp_path / "face.nii.gz"
    code = cli.main(
        ["--i", str(src), "--o", str(out), "--fill-const", "1000", "0", "--facemask", str(facemask)]
    )
    assert code == 0
    img = nib.load(out)
    assert isinstance(img, nib.MGHImage)
    face = np.asarray(nib.load(facemask).dataobj)
    real = np.asarray(img.dataobj)  # MGZ keeps no scaling: real units, float32
    real_src = np.asarray(nib.load(src).dataobj)
    slope = nib.load(src).dataobj.slope
    inner = (face == 1) | (face == 2)
    inner[: len(fill.CODE_TAG), 0, 0] = False
    assert np.all(np.abs(real[inner] - 1000) <= slope / 2)  # 1000 in real units, not stored
    assert np.all(real[(face == 3) | (face == 4)] == 0)
    untouched = face == 0
    untouched[: len(fill.CODE_TAG), 0, 0] = False
    assert np.allclose(real[untouched], real_src[untouched])


def test_no_samseg_falls_back_to_the_atlas_exclusion_mask(tmp_path):
    """--no-samseg: brain and eyes of the atlas priors, through the registration, are protected."""
    import json

    name = "IXI013-HH-1212-T1_ds.nii.gz"
    assert cli.main(["--i", str(HEADS_DIR / name), "--odir", str(tmp_path), "--no-samseg"]) == 0
    src = io.stored_data(nib.load(HEADS_DIR / name))
    out = io.stored_data(nib.load(tmp_path / "defaced.nii.gz"))
    xmask = np.asarray(nib.load(tmp_path / "exclusion.mask.nii.gz").dataobj) > 0
    assert xmask.sum() > 100_000
    assert np.count_nonzero((src != out) & xmask) == 0
    assert np.count_nonzero((src != out) & independent_brain_mask(str(HEADS_DIR / name))) == 0
    assert not (tmp_path / "seg.nii.gz").exists()
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["exclusion"]["method"] == "atlas"
