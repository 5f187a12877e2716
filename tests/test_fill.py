"""Tests of face filling and the provenance tag on real heads."""

import itertools
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import FACE_HEADS, HEADS_DIR

from mideface_nipype.engine.fill import (
    CODE_TAG,
    DEFAULT_SEED,
    NBINS_MAX,
    NPERBIN,
    check_code,
    code_fits,
    code_location,
    compartment_stats,
    deface,
    embed_code,
    fill_face,
    is_shareable,
    shareable_face_mask,
    split_tissue_air,
)

IXI = "IXI012-HH-1211-T1_ds.nii.gz"
XA30 = "dcmqa-xa30_T1w_2mm.nii.gz"
FLIPS = [
    (perm, flips)
    for perm in itertools.permutations(range(3))
    for flips in itertools.product((False, True), repeat=3)
]


def _load(name: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(HEADS_DIR / name)
    return np.asanyarray(img.dataobj.get_unscaled()), img


def _face_mask(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Crude 4-compartment mask: a 'template surface' plane a few voxels behind the nose tip.

    Head = voxels above 15 % of the maximum; inner slab (compartments 1/2) is 12 voxels behind
    the plane, outer slab (3/4) the 12 voxels in front of it (nose in 3, air in 4).
    """
    codes = nib.aff2axcodes(affine)
    axis = next(i for i, c in enumerate(codes) if c in "AP")
    head = data > 0.15 * data.max()
    moved = np.moveaxis(head, axis, 0)
    if codes[axis] == "P":  # index 0 = most anterior: make the front the low end
        moved = moved[::-1]
    front = np.flatnonzero(moved.any(axis=(1, 2))).max()
    plane = front - 8
    labels = np.zeros(moved.shape, np.uint8)
    inner = labels[plane - 12 : plane]
    outer = labels[plane : plane + 12]
    inner[...] = np.where(moved[plane - 12 : plane], 1, 2)
    outer[...] = np.where(moved[plane : plane + 12], 3, 4)
    if codes[axis] == "P":
        labels = labels[::-1]
    return np.ascontiguousarray(np.moveaxis(labels, 0, axis))


@pytest.fixture(scope="module", params=[IXI, XA30])
def head(request) -> tuple[np.ndarray, np.ndarray]:
    data, img = _load(request.param)
    return data, _face_mask(data, img.affine)


@pytest.fixture(scope="module")
def ixi() -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    data, img = _load(IXI)
    return data, _face_mask(data, img.affine), img


def test_mask_has_all_compartments(head):
    _, mask = head
    assert all(np.count_nonzero(mask == k) > 100 for k in range(5))


def test_shareable_mask_loses_the_skin_and_splits_back_at_the_head(head):
    """The tissue/air split is the original skin: the shareable mask drops it, and the head
    mask it was made from puts it back exactly."""
    data, mask = head
    shared = shareable_face_mask(mask)
    assert set(np.unique(shared)) == {0, 1, 3} and is_shareable(shared)
    assert not is_shareable(mask)
    assert np.array_equal(shared > 0, mask > 0)
    assert np.array_equal(split_tissue_air(shared, data > 0.15 * data.max()), mask)


def test_fill_replaces_face_and_keeps_the_rest(head):
    data, mask = head
    before = data.copy()
    out, stats = fill_face(data, mask)
    assert np.array_equal(data, before)  # input untouched
    assert out.dtype == data.dtype and out.shape == data.shape
    keep = mask == 0
    assert out[keep].tobytes() == data[keep].tobytes()
    assert np.mean(out[mask > 0] != data[mask > 0]) > 0.5

    inner = out[(mask == 1) | (mask == 2)].astype(float)
    half = stats.std1 / 2 + 0.5  # +0.5 for rounding to integers
    assert stats.mean1 - stats.std1 / 2 > 0  # abs() does not fold this range
    assert inner.min() >= stats.mean1 - half and inner.max() <= stats.mean1 + half
    assert abs(inner.mean() - stats.mean1) < 0.02 * stats.std1 + 0.5
    # uniform of width std1 -> SD std1/sqrt(12)
    assert inner.std() == pytest.approx(stats.std1 / np.sqrt(12), rel=0.05)

    outer = out[(mask == 3) | (mask == 4)].astype(float)
    dist = np.minimum(np.abs(outer - stats.mode4), np.abs(outer + stats.mode4))
    assert dist.max() <= stats.std4 / 2 + 0.5
    assert outer.max() < stats.mean1 - stats.std1 / 2


def test_stats_match_numpy(head):
    data, mask = head
    stats = compartment_stats(data, mask)
    v1, v4 = data[mask == 1].astype(float), data[mask == 4].astype(float)
    assert (stats.n1, stats.n4) == (v1.size, v4.size)
    assert (stats.n2, stats.n3) == (np.sum(mask == 2), np.sum(mask == 3))
    assert stats.mean1 == pytest.approx(v1.mean()) and stats.std1 == pytest.approx(v1.std())
    assert stats.mean4 == pytest.approx(v4.mean()) and stats.std4 == pytest.approx(v4.std())
    assert (stats.min1, stats.max1) == (v1.min(), v1.max())
    assert (stats.min4, stats.max4) == (v4.min(), v4.max())
    low = int(v4.min())
    assert stats.mode4 == low + np.argmax(np.bincount((v4 - low).astype(int)))
    assert stats.nbins4 == v4.max() - v4.min() + 1
    assert stats.mean_ratio == pytest.approx(v1.mean() / v4.mean())
    assert json.loads(json.dumps(stats.to_dict())) == stats.to_dict()


def test_seed_reproducible(ixi):
    data, mask, _ = ixi
    a, _ = fill_face(data, mask, seed=DEFAULT_SEED)
    b, _ = fill_face(data, mask)
    c, _ = fill_face(data, mask, seed=DEFAULT_SEED + 1)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_4d_every_frame_filled_from_stat_frame():
    data, img = _load(XA30)
    mask = _face_mask(data, img.affine)
    vol = np.stack([data, data * 3, data // 2], axis=-1).astype(np.int16)
    out, stats = fill_face(vol, mask, stat_frame=1)
    assert stats == compartment_stats(vol[..., 1], mask)
    assert out.shape == vol.shape and out.dtype == vol.dtype
    assert out[mask == 0].tobytes() == vol[mask == 0].tobytes()
    inner = (mask == 1) | (mask == 2)
    for f in range(3):
        vals = out[..., f][inner].astype(float)
        assert abs(vals.mean() - stats.mean1) < 0.02 * stats.std1 + 0.5
        assert np.abs(vals - stats.mean1).max() <= stats.std1 / 2 + 0.5
    assert not np.array_equal(out[..., 0][inner], out[..., 1][inner])  # independent draws
    again, _ = fill_face(vol, mask, stat_frame=1)
    assert again.tobytes() == out.tobytes()


def test_float32_uses_binned_mode(ixi):
    raw, mask, img = ixi
    data = (raw * np.float32(img.dataobj.slope)).astype(np.float32)
    out, stats = fill_face(data, mask)
    assert out.dtype == np.float32
    assert out[mask == 0].tobytes() == data[mask == 0].tobytes()
    v4 = data[mask == 4].astype(np.float64)
    nbins = min(int(np.ceil(stats.n1 / NPERBIN)), NBINS_MAX)
    assert stats.nbins4 == nbins
    half = (v4.max() - v4.min()) / (nbins - 1) / 2
    counts, edges = np.histogram(v4, bins=nbins, range=(v4.min() - half, v4.max() + half))
    assert stats.mode4 == pytest.approx(edges[np.argmax(counts)] + half)
    outer = out[(mask == 3) | (mask == 4)].astype(np.float64)
    dist = np.minimum(np.abs(outer - stats.mode4), np.abs(outer + stats.mode4))
    assert dist.max() <= stats.std4 / 2 * (1 + 1e-6)
    inner = out[(mask == 1) | (mask == 2)].astype(np.float64)
    assert np.abs(inner - stats.mean1).max() <= stats.std1 / 2 * (1 + 1e-6)


def test_int8_negative_background_abs_and_clip(ixi):
    raw, mask, _ = ixi
    data = (raw.astype(np.int16) // 2 - 100).astype(np.int8)  # background at -100
    out, stats = fill_face(data, mask)
    assert out.dtype == np.int8
    assert stats.mode4 == -100
    outer = out[(mask == 3) | (mask == 4)].astype(float)
    assert outer.min() >= 0  # abs() folds the negative background
    assert np.abs(outer - 100).max() <= stats.std4 / 2 + 0.5
    const, _ = fill_face(data, mask, fill_const=(1e6, -5.0))
    assert np.all(const[(mask == 1) | (mask == 2)] == 127)  # clipped, not wrapped
    assert np.all(const[(mask == 3) | (mask == 4)] == 5)


def test_fill_const(head):
    data, mask = head
    out, _ = fill_face(data, mask, fill_const=(80.4, 3.6))
    assert np.all(out[(mask == 1) | (mask == 2)] == 80)
    assert np.all(out[(mask == 3) | (mask == 4)] == 4)
    assert out[mask == 0].tobytes() == data[mask == 0].tobytes()


def test_empty_compartment_and_bad_input(ixi):
    data, mask, _ = ixi
    no4 = np.where(mask == 4, 0, mask).astype(np.uint8)
    with pytest.raises(ValueError, match="compartment 4"):
        fill_face(data, no4)
    with pytest.raises(ValueError, match="compartment 1"):
        compartment_stats(data, np.where(mask == 1, 2, mask))
    with pytest.raises(ValueError, match="shape"):
        fill_face(data, mask[:-1])
    with pytest.raises(ValueError, match="labels"):
        fill_face(data, np.where(mask == 4, 7, mask))
    with pytest.raises(ValueError, match="stat_frame"):
        fill_face(data, mask, stat_frame=1)


def test_constant_compartment_degenerate():
    data = np.zeros((30, 30, 30), np.float32)
    mask = np.zeros(data.shape, np.uint8)
    mask[:10], mask[10:20] = 1, 4
    data[:10] = 7.5
    out, stats = fill_face(data, mask)
    assert (stats.mode4, stats.nbins4, stats.std1, stats.mean_ratio) == (0.0, 1, 0.0, None)
    assert np.all(out[:10] == 7.5) and np.all(out[10:20] == 0)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32])
def test_embed_and_check_all_48_orientations(dtype):
    raw, _ = _load(XA30)
    data = np.stack([raw[..., ::4], raw[..., 1::4]], axis=-1)  # small 4-D volume
    data = np.clip(data, 0, 127).astype(dtype)
    assert code_fits(data.shape)
    tagged = embed_code(data)
    assert not check_code(data)
    codes = [ord(ch) for ch in CODE_TAG]
    for f in range(2):
        assert tagged[: len(codes), 0, 0, f].tolist() == codes
    changed = np.zeros(data.shape, bool)
    changed[: len(codes), 0, 0] = True
    assert tagged[~changed].tobytes() == data[~changed].tobytes()
    for perm, flips in FLIPS:
        vol = np.transpose(tagged, perm + (3,))
        vol = np.flip(vol, [a for a in range(3) if flips[a]])
        assert check_code(vol), (perm, flips)


def test_check_code_recognises_freesurfer_tag_and_partial_tag_fails():
    data, _ = _load(XA30)
    fs = data.copy()
    tag = [ord(ch) for ch in "mideface-freesurfer-v001"]
    fs[: len(tag), 0, 0] = tag
    assert check_code(np.flip(np.transpose(fs, (2, 0, 1)), (0, 2)))
    partial = data.copy()
    partial[:10, 0, 0] = tag[:10]
    assert not check_code(partial)


@pytest.mark.parametrize("name", FACE_HEADS)
def test_check_code_false_on_real_heads(name):
    data, _ = _load(name)
    assert not check_code(data)


def _reoriented(data: np.ndarray):
    """Every one of the 48 axis reorientations of a 3-D or 4-D (frames last) array."""
    for perm, flips in FLIPS:
        vol = np.transpose(data, perm + tuple(range(3, data.ndim)))
        yield np.flip(vol, [a for a in range(3) if flips[a]]), (perm, flips)


@pytest.mark.parametrize(
    ("shape", "axis_order", "n_lines"),
    [
        ((18, 120, 120), [1, 2, 0], 1),  # the first axis is too short: the second axis
        ((10, 12, 40), [2, 1, 0], 1),
        ((12, 10, 8), [0, 1, 2], 2),  # no axis of 20: two lines
        ((4, 4, 4), [0, 1, 2], 5),  # the smallest valid volume: over two planes
        ((4, 5, 6), [2, 1, 0], 4),
    ],
)
def test_code_fits_any_grid(shape, axis_order, n_lines):
    raw, _ = _load(XA30)
    centre = [(n - s) // 2 for n, s in zip(raw.shape, shape, strict=True)]
    crop = raw[tuple(slice(c, c + s) for c, s in zip(centre, shape, strict=True))]
    assert crop.shape == shape and crop.std() > 0 and not check_code(crop)
    location = code_location(shape)
    assert (location["axis_order"], location["n_lines"]) == (axis_order, n_lines)
    assert location["first_voxel"] == [0, 0, 0]
    tagged = embed_code(crop)
    codes = np.array([ord(ch) for ch in CODE_TAG])
    # the tag: first voxels of the grid in axis_order, first axis fastest
    order = np.transpose(tagged, axis_order).ravel(order="F")
    assert order[: codes.size].tolist() == codes.tolist()
    flat = np.zeros(crop.size, bool)
    flat[: codes.size] = True
    changed = np.transpose(
        flat.reshape([shape[a] for a in axis_order], order="F"), np.argsort(axis_order)
    )
    assert tagged[tuple(location["last_voxel"])] == codes[-1]
    assert tagged[~changed].tobytes() == crop[~changed].tobytes()
    for vol, orientation in _reoriented(tagged):
        assert check_code(vol), orientation
    for vol, orientation in _reoriented(crop):
        assert not check_code(vol), orientation


def test_code_layout_of_older_results_is_kept(ixi):
    """A volume whose first axis has 20 voxels keeps the original layout, ``(k, 0, 0)``."""
    data, _, _ = ixi
    assert code_location(data.shape)["axis_order"][0] == 0
    old = data.copy()
    old[: len(CODE_TAG), 0, 0] = [ord(ch) for ch in CODE_TAG]
    assert embed_code(data).tobytes() == old.tobytes()
    assert check_code(old)


@pytest.mark.parametrize(
    "dtype",
    [
        np.int8,
        np.uint8,
        np.int16,
        np.uint16,
        np.int32,
        np.uint32,
        np.int64,
        np.float32,
        np.float64,
    ],
)
@pytest.mark.parametrize("shape", [(18, 120, 120), (4, 4, 4)])
def test_code_survives_every_dtype_and_scaling(dtype, shape, tmp_path):
    """Saved with a slope and an intercept, the stored values still carry the tag."""
    raw, img = _load(XA30)
    crop = raw[
        tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(raw.shape, shape, strict=True))
    ]
    crop = np.clip(crop, 0, 127).astype(dtype)
    tagged = embed_code(crop)
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    out = nib.Nifti1Image(tagged, img.affine, header)
    out.header.set_slope_inter(2.5, -3.0)
    nib.save(out, tmp_path / "x.nii.gz")
    back = nib.load(tmp_path / "x.nii.gz")
    assert back.get_data_dtype() == dtype
    assert check_code(np.asanyarray(back.dataobj.get_unscaled()))


def test_embed_code_needs_twenty_voxels():
    data = np.ones((2, 3, 3), np.int16)
    assert not code_fits(data.shape)
    out = embed_code(data)
    assert np.array_equal(out, data) and out is not data
    with pytest.raises(ValueError, match="at least 20 voxels"):
        code_location(data.shape)


def test_deface_is_the_fill_then_the_tag(head):
    """``deface`` (what --i/--o and --apply-to both write) fills and then tags: the same bytes
    as the two steps, the tag readable, the statistics those of the fill."""
    data, mask = head
    out, stats = deface(data, mask, seed=DEFAULT_SEED + 3)
    filled, fill_stats = fill_face(data, mask, seed=DEFAULT_SEED + 3)
    assert np.array_equal(out, embed_code(filled)) and out.dtype == data.dtype
    assert check_code(out) and not check_code(filled)
    assert stats == fill_stats
