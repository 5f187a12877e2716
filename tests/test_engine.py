"""The engine end to end on real heads, through the ``mideface`` CLI and its Nipype workflow."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from brain import independent_brain_mask
from conftest import ALL_T1W_HEADS, FACE_HEADS, HEADS_DIR
from scipy import ndimage as ndi
from test_report import assert_renders_differ_in_the_face_only

from mideface_nipype import cli, fill, io, report
from mideface_nipype.segment import SEG_LABELS

#: Smallest mean change (mm) of the frontal skin depth over the face region after defacing.
MIN_MEAN_DEPTH_CHANGE_MM = 1.0
#: Voxels where the independent (SyN) brain mask is known to leak out of the skull: on dcmqa (its
#: strong coil shading) it reaches two voxels of nasal-cavity air at MNI (12, 68, -42) that lie
#: in face compartment 2 and that our segmentation labels air, 20 mm from any brain.
REFERENCE_LEAK_VOXELS = {"dcmqa-xa30_T1w_2mm.nii.gz": 2}
#: Smallest change (mm) of the skin depth at the subject's nose tip.
MIN_NOSE_TIP_CHANGE_MM = 4.0


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Deface every real T1w head once (``--odir`` keeps the masks, ``--pics`` the pictures)."""
    out = {}
    for name in ALL_T1W_HEADS:
        odir = tmp_path_factory.mktemp(name.split(".")[0])
        assert cli.main(["--i", str(HEADS_DIR / name), "--odir", str(odir), "--pics"]) == 0
        out[name] = odir
    return out


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


@pytest.mark.parametrize("name", FACE_HEADS)
def test_face_landmarks_are_replaced(runs, name):
    """Nose tip, lips and chin (found on the original) lie in the face mask and change."""
    src = nib.as_closest_canonical(nib.load(HEADS_DIR / name))
    face = np.asarray(nib.as_closest_canonical(nib.load(runs[name] / "face.mask.nii.gz")).dataobj)
    data = io.first_frame(src)
    zooms = np.asarray(src.header.get_zooms()[:3])
    skin = _skin(data, 0.5 * np.median(data[data > np.percentile(data, 50)]))
    depth = _frontal_depth_mm(skin, zooms[1])
    x_mid = np.argwhere(skin)[:, 0].mean()
    band = np.abs(np.arange(skin.shape[0]) - x_mid) * zooms[0] < 12
    midline = np.where(band[:, None], depth, -np.inf)
    nose_x, nose_z = np.unravel_index(np.nanargmax(midline), midline.shape)
    landmarks = {"nose tip": (nose_x, nose_z)}
    for label, (lo_mm, hi_mm) in {"lips": (15, 35), "chin": (45, 70)}.items():
        z_sel = np.zeros(skin.shape[2], bool)
        z_sel[max(0, nose_z - int(hi_mm / zooms[2])) : nose_z - int(lo_mm / zooms[2])] = True
        candidates = np.where(band[:, None] & z_sel[None, :], depth, -np.inf)
        landmarks[label] = np.unravel_index(np.nanargmax(candidates), candidates.shape)
    for label, (x, z) in landmarks.items():
        y = int(round(depth[x, z] / zooms[1]))
        assert face[x, y, z] > 0, f"{label} at voxel {(x, y, z)} is not in the face mask"


@pytest.mark.parametrize("name", FACE_HEADS)
def test_skin_surface_no_longer_the_subjects(runs, name):
    """The frontal skin depth map changes over the face and at the nose tip."""
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
    x_mid = np.argwhere(_skin(a, threshold))[:, 0].mean()
    band = np.abs(np.arange(a.shape[0]) - x_mid) * zooms[0] < 12
    nose = np.unravel_index(np.nanargmax(np.where(band[:, None], depth_a, -np.inf)), depth_a.shape)
    assert abs(depth_a[nose] - depth_b[nose]) >= MIN_NOSE_TIP_CHANGE_MM


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


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    src = str(HEADS_DIR / "dcmqa-xa30_T1w_2mm.nii.gz")
    outs = []
    for i, seed in enumerate(("53", "53", "7")):
        out = tmp_path / f"out{i}.nii.gz"
        assert cli.main(["--i", src, "--o", str(out), "--seed", seed]) == 0
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
