"""Tests of the ``mri_seghead`` head mask, mostly on real head MRIs."""

from typing import NamedTuple

import nibabel as nib
import numpy as np
import pytest
from conftest import ALL_T1W_HEADS, FACE_HEADS, HEADS_DIR
from scipy import ndimage

from mideface_nipype.engine.headmask import (
    MIN_HEAD_VOLUME_ML,
    THRESH1,
    NoHeadError,
    air_threshold,
    head_mask,
    head_volume_ml,
    rescale_to_uchar,
    scanline_fill,
    seghead,
)
from mideface_nipype.utils.geometry import voxel_sizes

# Adult heads with the part of the neck in view measured 3.4 L (chris, neck cut) to 4.8 L (IXI013).
HEAD_LITRES_RANGE = (3.0, 6.0)


class Head(NamedTuple):
    img: nib.Nifti1Image
    intensity: np.ndarray  # rescaled 0..255
    mask: np.ndarray  # bool, from head_mask
    voxel_ml: float


def load_data(name: str) -> np.ndarray:
    return np.asanyarray(nib.load(HEADS_DIR / name).dataobj)


@pytest.fixture(scope="module", params=ALL_T1W_HEADS)
def head(request: pytest.FixtureRequest) -> Head:
    img = nib.load(HEADS_DIR / request.param)
    mask_img = head_mask(img)
    assert mask_img.get_data_dtype() == np.uint8
    assert mask_img.shape == img.shape
    np.testing.assert_array_equal(mask_img.affine, img.affine)
    mask_values = np.asanyarray(mask_img.dataobj)
    assert set(np.unique(mask_values)) == {0, 1}
    return Head(
        img=img,
        intensity=rescale_to_uchar(np.asanyarray(img.dataobj)),
        mask=mask_values.astype(bool),
        voxel_ml=abs(np.linalg.det(img.affine[:3, :3])) / 1000.0,
    )


@pytest.fixture(scope="module")
def ixi_data() -> np.ndarray:
    return load_data(FACE_HEADS[0])


@pytest.fixture(scope="module")
def ixi_mask(ixi_data: np.ndarray) -> np.ndarray:
    return seghead(ixi_data)


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)


# ---------------------------------------------------------------------------- building blocks


def test_rescale_to_uchar_maps_robust_max_to_255_and_clips() -> None:
    ramp = np.arange(1.0, 1001.0)
    out = rescale_to_uchar(np.concatenate([ramp, [1e6, -5.0, 0.0, np.nan, np.inf, -np.inf]]))
    # the 0.999 quantile of the 1001 positive values is 1000, the outlier does not count
    np.testing.assert_allclose(out[:1000], ramp * 255 / 1000.0)
    assert out[1000] == 255  # the outlier is clipped, not used as the maximum
    np.testing.assert_array_equal(out[1001:], 0)  # negatives, zero, NaN and infinities
    np.testing.assert_array_equal(rescale_to_uchar(np.zeros(5)), 0)


def test_rescale_to_uchar_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="robust_max_frac"):
        rescale_to_uchar(np.ones(3), robust_max_frac=0.0)


@pytest.mark.parametrize(
    ("nhits", "expected"),
    [
        (1, "0111111111110"),
        (2, "0001111111110"),
        (3, "0000001110000"),
        (4, "0000000000000"),
    ],
)
def test_scanline_fill_spans_first_to_last_run(nhits: int, expected: str) -> None:
    line = np.array([int(c) for c in "0101101110110"], dtype=bool)
    volume = np.zeros((2, 3, line.size), dtype=bool)
    volume[1, 2] = line
    want = np.zeros_like(volume)
    want[1, 2] = [c == "1" for c in expected]
    np.testing.assert_array_equal(scanline_fill(volume, 2, nhits), want)
    # the same line along another axis gives the same fill
    moved = np.moveaxis(volume, 2, 0)
    np.testing.assert_array_equal(scanline_fill(moved, 0, nhits), np.moveaxis(want, 2, 0))


# ---------------------------------------------------------------------------- real heads


def test_head_volume_is_plausible(head: Head) -> None:
    litres = head_volume_ml(head.mask, head.img.affine) / 1000.0
    assert HEAD_LITRES_RANGE[0] < litres < HEAD_LITRES_RANGE[1]
    by_edges_ml = np.count_nonzero(head.mask) * np.prod(voxel_sizes(head.img.affine)) / 1000.0
    assert litres * 1000.0 == pytest.approx(by_edges_ml, rel=1e-9)


def test_mask_contains_the_brain_centre(head: Head) -> None:
    positive = head.intensity[head.intensity > 0]
    bright = head.intensity > np.median(positive)
    centre = np.round(ndimage.center_of_mass(bright)).astype(int)
    block = tuple(slice(c - 5, c + 6) for c in centre)
    assert head.mask[block].all()


def test_corners_are_outside(head: Head) -> None:
    corners = np.array(list(np.ndindex(2, 2, 2))) * (np.array(head.mask.shape) - 1)
    assert not head.mask[tuple(corners.T)].any()


def test_mask_is_one_component_without_holes(head: Head) -> None:
    _, n_components = ndimage.label(head.mask)
    assert n_components == 1
    np.testing.assert_array_equal(ndimage.binary_fill_holes(head.mask), head.mask)


def test_mask_has_no_holes_in_any_slice(ixi_mask: np.ndarray) -> None:
    for axis in range(3):
        in_plane = np.zeros((3, 3, 3), dtype=bool)
        plane = [slice(None)] * 3
        plane[axis] = 1
        in_plane[tuple(plane)] = ndimage.generate_binary_structure(2, 1)
        filled = ndimage.binary_fill_holes(ixi_mask, structure=in_plane)
        np.testing.assert_array_equal(filled, ixi_mask)


def test_mask_holds_all_tissue_and_little_background(head: Head) -> None:
    """Face, nose and ears are tissue: nearly all of it is in; outside is dark background."""
    tissue = largest_component(head.intensity > THRESH1)
    assert np.count_nonzero(tissue & head.mask) > 0.99 * np.count_nonzero(tissue)
    assert np.quantile(head.intensity[~head.mask], 0.99) < THRESH1


def test_dark_cavities_open_to_the_outside_are_inside(head: Head) -> None:
    """Airway, sinuses, mouth: dark regions that a plain 3-D hole fill of tissue leaves out."""
    tissue_filled = ndimage.binary_fill_holes(largest_component(head.intensity > THRESH1))
    dark_cavities = head.mask & ~tissue_filled & (head.intensity <= THRESH1)
    assert np.count_nonzero(dark_cavities) * head.voxel_ml > 100.0


# ---------------------------------------------------------------------------- geometry


def test_flipped_and_transposed_head_gives_the_same_mask(
    ixi_data: np.ndarray, ixi_mask: np.ndarray
) -> None:
    def reorient(volume: np.ndarray) -> np.ndarray:
        return np.flip(np.transpose(volume, (2, 0, 1)), axis=(0, 2))

    np.testing.assert_array_equal(seghead(reorient(ixi_data)), reorient(ixi_mask))


def test_memory_order_does_not_change_scale_threshold_or_mask(
    ixi_data: np.ndarray, ixi_mask: np.ndarray
) -> None:
    """The robust maximum and the air threshold gather voxels in memory order: the same numbers
    for a Fortran-ordered volume (as nibabel gives) and its C-ordered copy."""
    data = np.asfortranarray(ixi_data.astype(np.float32))
    c_data = np.ascontiguousarray(data)
    scaled, c_scaled = rescale_to_uchar(data), rescale_to_uchar(c_data)
    np.testing.assert_array_equal(scaled, c_scaled)
    assert air_threshold(scaled) == air_threshold(np.ascontiguousarray(c_scaled))
    np.testing.assert_array_equal(seghead(data), ixi_mask)
    np.testing.assert_array_equal(seghead(c_data), ixi_mask)


def test_head_off_centre_uses_largest_component(ixi_data: np.ndarray, ixi_mask: np.ndarray) -> None:
    """With the head in one end of the field of view, the central seed lies in the air."""
    padding = ((0, 140), (0, 0), (0, 0))
    padded_mask = seghead(np.pad(ixi_data, padding))
    assert not padded_mask[padded_mask.shape[0] // 2].any()
    np.testing.assert_array_equal(padded_mask, np.pad(ixi_mask, padding))


def test_a_speck_at_the_centre_does_not_beat_the_head(
    ixi_data: np.ndarray, ixi_mask: np.ndarray
) -> None:
    """A bright 2-voxel speck at the centre of a field of view whose head lies off-centre (the
    failure seen on a T2-like contrast) loses to the head."""
    padding = ((0, 140), (0, 0), (0, 0))
    data = np.pad(ixi_data, padding).astype(np.float32)
    centre = tuple(n // 2 for n in data.shape)
    data[centre[0] : centre[0] + 2, centre[1], centre[2]] = ixi_data.max()
    mask = seghead(data)
    assert not mask[centre]
    # the two bright voxels shift the robust maximum a little: a voxel may differ at the skin
    assert np.count_nonzero(mask != np.pad(ixi_mask, padding)) < 10


def test_every_t1w_keeps_the_freesurfer_threshold(head: Head) -> None:
    """The air threshold only moves for images whose robust maximum is not bright tissue."""
    assert air_threshold(head.intensity) == THRESH1


def test_a_bright_compartment_does_not_leave_only_specks(
    ixi_data: np.ndarray, ixi_mask: np.ndarray
) -> None:
    """The dark inside of the head (sinus air, bone, CSF: a tenth of the volume) made 50 times
    brighter than any tissue, as an inverted contrast can make it: the robust maximum lands
    there, the rest of the head falls under the fixed threshold, which left specks of it
    ("largest region has 389 voxels")."""
    data = ixi_data.astype(np.float32)
    dark_inside = ndimage.binary_erosion(ixi_mask, iterations=3) & (data < 0.2 * data.max())
    assert dark_inside.mean() > 0.05
    data[dark_inside] = 50.0 * ixi_data.max()
    intensity = rescale_to_uchar(data)
    rest = ixi_mask & ~dark_inside
    assert np.count_nonzero(intensity[rest] > THRESH1) == 0
    assert air_threshold(intensity) < THRESH1
    mask = seghead(data)
    dice = 2 * np.count_nonzero(mask & ixi_mask) / (mask.sum() + ixi_mask.sum())
    assert dice > 0.95


def test_no_head_error_names_the_file(tmp_path) -> None:
    path = tmp_path / "sub-01_T2w.nii.gz"
    noise = np.random.default_rng(0).normal(100, 10, (40, 40, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, np.diag([4.0, 4.0, 4.0, 1.0])), path)
    with pytest.raises(NoHeadError, match=f"^{path}: no head found in the image"):
        head_mask(nib.load(path))
    with pytest.raises(NoHeadError, match="^no head found in the image"):  # no file, no name
        head_mask(nib.Nifti1Image(noise, np.eye(4)))


def test_head_mask_uses_first_frame(ixi_data: np.ndarray, ixi_mask: np.ndarray) -> None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    frames = np.stack([ixi_data, np.zeros_like(ixi_data)], axis=-1)
    mask_img = head_mask(nib.Nifti1Image(frames, affine))
    assert mask_img.shape == ixi_data.shape
    np.testing.assert_array_equal(np.asanyarray(mask_img.dataobj), ixi_mask)


def test_non_finite_values_do_not_crash(ixi_data: np.ndarray, ixi_mask: np.ndarray) -> None:
    data = ixi_data.astype(np.float32)
    rng = np.random.default_rng(0)
    inside = np.flatnonzero(ixi_mask)
    data.flat[rng.choice(inside, 500, replace=False)] = np.nan
    data.flat[rng.choice(inside, 5, replace=False)] = np.inf
    data[0, 0, :] = np.nan
    n_changed = np.count_nonzero(seghead(data) != ixi_mask)
    assert n_changed < 0.001 * ixi_mask.sum()


# ---------------------------------------------------------------------------- no head


@pytest.mark.parametrize("value", [0.0, 100.0, -3.0, np.nan])
def test_empty_or_constant_volume_raises(value: float) -> None:
    with pytest.raises(NoHeadError, match="no head found in the image"):
        seghead(np.full((20, 24, 22), value))


def test_noise_speck_raises() -> None:
    data = np.zeros((50, 50, 50))
    data[24:27, 24:27, 24:27] = 100.0  # 27 voxels, less than 0.1 % of the volume
    with pytest.raises(NoHeadError, match="no head found in the image"):
        seghead(data)


def test_head_smaller_than_minimum_volume_raises() -> None:
    data = np.zeros((40, 40, 40), dtype=np.float32)
    data[15:25, 15:25, 15:25] = 100.0  # 1.6 % of the volume but only 1 mL at 1 mm
    img = nib.Nifti1Image(data, np.eye(4))
    with pytest.raises(NoHeadError, match=f"smaller than {MIN_HEAD_VOLUME_ML:.0f} mL"):
        head_mask(img)
    assert issubclass(NoHeadError, ValueError)
