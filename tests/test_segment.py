"""Tests of the SAMSEG-style segmentation on real heads (T1w, PD) and a synthetic T2-like contrast.

Segmentations are computed once per module and shared; registrations once per session (the
engine's runs of the same heads give the same ones, see ``runcache``).
"""

import time
import tracemalloc
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pytest
from conftest import FACE_HEADS, HEADS_DIR
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation
from skimage.filters import threshold_multiotsu

from mideface_nipype.engine import headmask, register
from mideface_nipype.engine.atlas import CLASSES, load_atlas
from mideface_nipype.engine.exclusion import XMASK_DILATE_VOX
from mideface_nipype.engine.segment import (
    PROTECTED_CLASSES,
    SEG_LABELS,
    SEGMENT_MM,
    Segmentation,
    brain_mask,
    exclusion_mask,
    segment,
    voxel_volume_ml,
)
from mideface_nipype.utils import geometry, io
from mideface_nipype.utils.geometry import GridImage

IXI_HEADS = [name for name in FACE_HEADS if name.startswith("IXI")]
DCMQA = "dcmqa-xa30_T1w_2mm.nii.gz"
COLIN = "colin27_ch2_T1w.nii.gz"
CHRIS_T1W = "chris_T1w.nii.gz"
CHRIS_PD = "chris_PD.nii.gz"
#: Every real T1w head: the IXI heads, the XA30 MPRAGE with strong coil shading, colin27 and the
#: 0.88 mm chris_T1w (chris_PD, its PD pair, has its own test below).
DICE_HEADS = IXI_HEADS + [DCMQA, COLIN, CHRIS_T1W]
#: Heads with both eyes in view (colin27's box cuts the orbits).
EYE_HEADS = IXI_HEADS + [DCMQA, CHRIS_T1W]
#: Heads for the skull test (2 mm, 1 mm and 0.88 mm grids).
BONE_HEADS = DICE_HEADS

MIN_BRAIN_DICE = 0.90
MIN_CONTRAST_DICE = 0.85
#: Each eye (a ball of ~24 mm diameter is ~7 mL) must get at least this volume of eye labels.
MIN_EYE_ML = 2.5
#: Fraction of rays from the brain centre (up, forward, sideways) that must cross bone.
MIN_BONE_RAY_FRACTION = 0.9
MAX_PEAK_MEMORY_GB = 1.5


class Case(NamedTuple):
    img: nib.Nifti1Image
    data: np.ndarray
    head: np.ndarray
    subject_to_atlas: np.ndarray
    seg: Segmentation
    seconds: float
    peak_gb: float


@pytest.fixture(scope="module")
def atlas():
    return load_atlas()


def _register(atlas, data, affine, head) -> np.ndarray:
    matrix, _ = register.register_atlas(GridImage(data, affine, head), atlas)
    return matrix


def _measured_segment(data, affine, head, atlas, matrix) -> tuple[Segmentation, float, float]:
    """segment() (with its posteriors on the input grid, which ``synthetic_t2`` mixes) with its
    wall time and the peak of Python/numpy allocations (tracemalloc)."""
    tracemalloc.start()
    start = time.perf_counter()
    seg = segment(data, affine, head, atlas, matrix, with_posteriors=True)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 1e9
    tracemalloc.stop()
    return seg, seconds, peak


@pytest.fixture(scope="module")
def cases(atlas):
    """Lazily computed, cached per head, grid and given registration: image, head mask,
    registration, segmentation."""
    cache: dict[tuple, Case] = {}

    def get(name: str, matrix: np.ndarray | None = None, spacing_mm: float = 0.0) -> Case:
        """``spacing_mm`` > 0: use the head resampled (anti-aliased) to that axis-aligned grid."""
        key = (name, spacing_mm, None if matrix is None else matrix.tobytes())
        if key not in cache:
            img = nib.load(HEADS_DIR / name)
            data = io.first_frame(img)
            if spacing_mm > 0:
                data, affine = geometry.smooth_downsample(data, img.affine, spacing_mm)
                img = nib.Nifti1Image(data, affine)
            head = np.asarray(headmask.head_mask(img).dataobj) > 0
            if matrix is None:
                matrix = _register(atlas, data, img.affine, head)
            seg, seconds, peak = _measured_segment(data, img.affine, head, atlas, matrix)
            cache[key] = Case(img, data, head, matrix, seg, seconds, peak)
        return cache[key]

    return get


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


# ---------------------------------------------------------------------------------------------
# An independent brain extraction for T1w heads
# ---------------------------------------------------------------------------------------------


def _ball(radius_vox: float) -> np.ndarray:
    n = int(np.ceil(radius_vox))
    grid = np.mgrid[-n : n + 1, -n : n + 1, -n : n + 1]
    return (grid**2).sum(0) <= radius_vox**2 + 1e-6


def _fill_holes_slicewise(mask: np.ndarray) -> np.ndarray:
    mask = ndi.binary_fill_holes(mask)
    for axis in range(3):
        planes = [ndi.binary_fill_holes(p) for p in np.moveaxis(mask, axis, 0)]
        mask = np.moveaxis(np.stack(planes), 0, axis)
    return mask


def reference_brain_mask(data: np.ndarray, affine: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Classical T1w skull strip: intensities and morphology only, no atlas, no registration.

    Independent of ``segment``: it uses neither the atlas priors nor the atlas registration (its
    few thresholds were tuned by eye on these heads). At
    2 mm: homomorphic shading correction (divide by the head's 24 mm Gaussian mean), three-class
    Otsu of the deep head (CSF | GM | WM), brain tissue = above the CSF/GM threshold and below
    1.3 x WM (excludes fat), 5 mm erosion to cut the bridges to the scalp, largest component,
    conditional 5 mm dilation, 6 mm closing (sulcal CSF), holes filled (3-D and per slice), 2 mm
    growth (the CSF layer over the cortex, which ``segment`` counts as brain).
    """
    mm = 2.0
    d, aff = geometry.smooth_downsample(data, affine, mm)
    h = geometry.smooth_downsample(head.astype(np.float32), affine, mm)[0] > 0.5
    sigma = 24.0 / mm
    local = ndi.gaussian_filter(np.where(h, d, 0), sigma)
    local /= np.maximum(ndi.gaussian_filter(h.astype(np.float32), sigma), 1e-3)
    d = np.where(h, d / np.maximum(local, 1e-6), 0)
    deep = h & (ndi.distance_transform_edt(h) * mm > 25.0)
    csf_gm, gm_wm = threshold_multiotsu(d[deep], 3)
    wm = float(np.median(d[deep][d[deep] > gm_wm]))
    tissue = h & (d > csf_gm) & (d < 1.3 * wm)
    core = ndi.binary_erosion(tissue, _ball(5.0 / mm))
    lab, _ = ndi.label(core)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    brain = ndi.binary_dilation(lab == np.argmax(sizes), _ball(5.0 / mm)) & tissue
    brain = ndi.binary_dilation(brain, _ball(6.0 / mm))
    brain = ndi.binary_erosion(brain, _ball(6.0 / mm), border_value=1)
    brain = _fill_holes_slicewise(brain)
    brain = ndi.binary_dilation(brain, _ball(2.0 / mm)) & h
    return geometry.resample(brain.astype(np.float32), aff, data.shape, affine) > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", DICE_HEADS)
def test_brain_matches_independent_skull_strip(cases, name):
    case = cases(name)
    reference = reference_brain_mask(case.data, case.img.affine, case.head)
    brain = brain_mask(case.seg.labels)
    vox_ml = voxel_volume_ml(case.img.affine)
    score = dice(brain, reference)
    print(
        f"{name}: brain Dice {score:.3f}, brain {brain.sum() * vox_ml:.0f} mL, "
        f"reference {reference.sum() * vox_ml:.0f} mL, ICV {case.seg.icv_ml:.0f} mL"
    )
    assert score >= MIN_BRAIN_DICE
    # adult intracranial volumes
    assert 1000.0 < case.seg.icv_ml < 2200.0


# ---------------------------------------------------------------------------------------------
# Eyes and skull
# ---------------------------------------------------------------------------------------------


def _atlas_points(case: Case, mask: np.ndarray) -> np.ndarray:
    """MNI (atlas) mm of the voxels of ``mask``."""
    return geometry.apply_affine(case.subject_to_atlas @ case.img.affine, np.argwhere(mask))


@pytest.mark.slow
@pytest.mark.parametrize("name", EYE_HEADS)
def test_eyes_in_both_orbits(cases, name):
    case = cases(name)
    eyes = _atlas_points(case, case.seg.labels == SEG_LABELS["eyes"])
    brain_centre = _atlas_points(case, brain_mask(case.seg.labels)).mean(0)
    vox_ml = voxel_volume_ml(case.img.affine)
    front = eyes[:, 1] > brain_centre[1] + 40.0  # well in front of the brain's centre
    low = eyes[:, 2] < brain_centre[2]  # below it (the orbits)
    right = eyes[front & low & (eyes[:, 0] > 5.0)]
    left = eyes[front & low & (eyes[:, 0] < -5.0)]
    print(f"{name}: eyes right {len(right) * vox_ml:.1f} mL, left {len(left) * vox_ml:.1f} mL")
    assert len(right) * vox_ml >= MIN_EYE_ML
    assert len(left) * vox_ml >= MIN_EYE_ML
    # eye labels elsewhere are rare, and the two eyes are an inter-pupillary distance apart
    assert (len(right) + len(left)) >= 0.9 * len(eyes)
    assert 45.0 < np.linalg.norm(right.mean(0) - left.mean(0)) < 80.0


def _along_ray(
    case: Case, volumes: tuple[np.ndarray, ...], start_mni: np.ndarray, direction: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Values of subject-grid volumes every 1 mm along a ray given in atlas space."""
    steps = np.arange(0.0, 160.0, 1.0)
    world = geometry.apply_affine(
        np.linalg.inv(case.subject_to_atlas), start_mni + steps[:, None] * direction
    )
    vox = np.round(geometry.apply_affine(np.linalg.inv(case.img.affine), world)).astype(int)
    vox = vox[np.all((vox >= 0) & (vox < case.seg.labels.shape), axis=1)]
    return tuple(v[tuple(vox.T)] for v in volumes)


def _ray_directions() -> np.ndarray:
    """Up, forward and sideways: elevations 10-90 degrees, azimuths away from the back."""
    dirs = [(0.0, 0.0, 1.0)]
    for elevation in (10.0, 30.0, 50.0, 70.0):
        for azimuth in range(0, 360, 30):
            el, az = np.deg2rad(elevation), np.deg2rad(azimuth)
            d = (np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el))
            if d[1] >= -0.3 or elevation >= 60.0:
                dirs.append(d)
    return np.array(dirs)


@pytest.mark.slow
@pytest.mark.parametrize("name", BONE_HEADS)
def test_bone_between_brain_and_scalp(cases, name):
    """Along rays from the brain centre, bone lies between the brain and the outer soft tissue."""
    case = cases(name)
    brain = brain_mask(case.seg.labels)
    centre = _atlas_points(case, brain).mean(0)
    crossed, counted = 0, 0
    for direction in _ray_directions():
        labels, in_brain = _along_ray(case, (case.seg.labels, brain), centre, direction)
        if not in_brain.any():
            continue
        after = labels[np.flatnonzero(in_brain)[-1] + 1 :]
        air = np.flatnonzero(after == SEG_LABELS["air"])
        between = after[: air[0]] if air.size else after
        soft = np.flatnonzero(between == SEG_LABELS["soft"])
        bone = np.flatnonzero(between == SEG_LABELS["bone"])
        if soft.size == 0:
            continue  # the field of view ends before the scalp
        counted += 1
        crossed += bool(bone.size and bone[0] < soft[-1])
    print(f"{name}: {crossed}/{counted} rays cross bone between brain and scalp")
    assert counted >= 20
    assert crossed >= MIN_BONE_RAY_FRACTION * counted


# ---------------------------------------------------------------------------------------------
# Contrast adaptivity
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pd_slab_matches_t1w_same_session(cases):
    """A real PD slab and the T1w of the same session agree on the brain (in world space).

    Both share scanner space, so the T1w's registration serves the PD too: this test is about
    the intensity model (PD: grey and white matter nearly equal), not registration. The 0.88 mm
    T1w is taken at 2 mm (the segmentation's grid) to keep the test fast.
    """
    t1w = cases(CHRIS_T1W, spacing_mm=SEGMENT_MM)
    assert np.allclose(geometry.voxel_sizes(t1w.img.affine), SEGMENT_MM)  # not the 0.88 mm case
    pd = cases(CHRIS_PD, matrix=t1w.subject_to_atlas)
    t1_brain = brain_mask(t1w.seg.labels).astype(np.float32)
    t1_on_pd = geometry.resample(t1_brain, t1w.img.affine, pd.data.shape, pd.img.affine) > 0.5
    score = dice(brain_mask(pd.seg.labels), t1_on_pd)
    print(f"PD vs T1w brain Dice {score:.3f}; PD class means {pd.seg.class_means}")
    assert score >= MIN_CONTRAST_DICE
    # learned, not assumed: white matter is clearly brighter than grey on the T1w, not on the PD
    assert t1w.seg.class_means["wm"] > 1.15 * t1w.seg.class_means["gm"]
    assert pd.seg.class_means["wm"] < 1.05 * pd.seg.class_means["gm"]


#: T2-like intensities per class (CSF and eyes bright, WM darker than GM, bone dark).
T2_MEANS = {
    "air": 5.0,
    "soft": 70.0,
    "bone": 12.0,
    "csf": 220.0,
    "gm": 120.0,
    "wm": 80.0,
    "eyes": 210.0,
}


def synthetic_t2(case: Case, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A T2-like image of a real T1w head, on a grid rotated by 15 degrees with 1.5 mm voxels.

    Each voxel mixes T2-like class intensities by the T1w posteriors and keeps the T1w's texture
    (its deviation from the class mean), then gets a smooth multiplicative shading and Rician
    noise. The world coordinates are those of the T1w, so the known transform is the identity.
    """
    post = case.seg.posteriors
    t1_model = post @ np.array([case.seg.class_means[c] for c in CLASSES], np.float32)
    texture = np.clip(case.data / np.maximum(t1_model, 1e-3) - 1.0, -0.5, 0.5)
    t2 = (post @ np.array([T2_MEANS[c] for c in CLASSES], np.float32)) * (1.0 + 0.5 * texture)
    axis = np.array([1.0, 0.5, 0.2]) / np.linalg.norm([1.0, 0.5, 0.2])
    rot = Rotation.from_rotvec(np.deg2rad(15.0) * axis).as_matrix()
    shape_iso, _ = geometry.iso_grid(case.data.shape, case.img.affine, 1.5)
    shape = tuple(int(np.ceil(n * 1.1)) for n in shape_iso)
    centre = geometry.apply_affine(case.img.affine, (np.array(case.data.shape) - 1)[None] / 2)[0]
    new_affine = np.eye(4)
    new_affine[:3, :3] = rot * 1.5
    new_affine[:3, 3] = centre - new_affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    out = geometry.resample(t2, case.img.affine, shape, new_affine)
    u = [np.linspace(-1.0, 1.0, n) for n in shape]
    shading = np.exp(
        0.35 * u[0][:, None, None]
        - 0.25 * u[2][None, None, :] ** 2
        + 0.2 * u[1][None, :, None] * u[2][None, None, :]
    )
    out = out * shading
    noise = rng.normal(0.0, 4.0, (2,) + shape)
    return np.hypot(out + noise[0], noise[1]).astype(np.float32), new_affine


@pytest.mark.slow
def test_synthetic_t2_on_rotated_grid_matches_t1w(cases, atlas):
    case = cases(IXI_HEADS[0])
    t2, t2_affine = synthetic_t2(case, np.random.default_rng(0))
    head = headmask.seghead(t2)
    seg = segment(t2, t2_affine, head, atlas, case.subject_to_atlas)
    # on this oblique grid the labels come from sampling the head's voxels: the argmax of the
    # posteriors made there
    with_post = segment(t2, t2_affine, head, atlas, case.subject_to_atlas, with_posteriors=True)
    np.testing.assert_array_equal(seg.labels, np.argmax(with_post.posteriors, -1))
    t1_brain = brain_mask(case.seg.labels).astype(np.float32)
    expected = geometry.resample(t1_brain, case.img.affine, t2.shape, t2_affine) > 0.5
    score = dice(brain_mask(seg.labels), expected)
    means = seg.class_means
    print(f"synthetic T2: brain Dice {score:.3f}; class means {means}")
    assert score >= MIN_CONTRAST_DICE
    # the learned intensities follow the T2 order, not a T1 order
    assert means["csf"] > means["gm"] > means["wm"]
    assert seg.labels.shape == t2.shape


# ---------------------------------------------------------------------------------------------
# Output contract
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_output_contract_and_determinism(cases, atlas):
    case = cases(IXI_HEADS[0])
    seg = case.seg
    shape = case.data.shape
    assert seg.labels.dtype == np.uint8 and seg.labels.shape == shape
    assert seg.posteriors.dtype == np.float32 and seg.posteriors.shape == shape + (len(CLASSES),)
    np.testing.assert_allclose(seg.posteriors.sum(-1), 1.0, atol=1e-5)
    assert seg.posteriors.min() >= 0.0
    np.testing.assert_array_equal(seg.labels, np.argmax(seg.posteriors, -1))
    assert set(np.unique(seg.labels)) <= set(SEG_LABELS.values())
    assert np.all(seg.labels[~case.head] == SEG_LABELS["air"])
    assert set(seg.class_means) == set(CLASSES) == set(seg.class_stds)
    assert 1 <= seg.iterations
    again = segment(
        case.data, case.img.affine, case.head, atlas, case.subject_to_atlas, with_posteriors=True
    )
    np.testing.assert_array_equal(again.labels, seg.labels)
    np.testing.assert_array_equal(again.posteriors, seg.posteriors)
    assert again.icv_ml == seg.icv_ml
    # without the posteriors (as defacing runs it): the same labels, class by class
    labels_only = segment(case.data, case.img.affine, case.head, atlas, case.subject_to_atlas)
    assert labels_only.posteriors is None
    np.testing.assert_array_equal(labels_only.labels, seg.labels)


@pytest.mark.slow
def test_same_labels_whatever_the_voxel_order(cases, atlas):
    """The same head stored with permuted and flipped axes (same world) gives the same labels."""
    case = cases(IXI_HEADS[0])
    perm, flip = (2, 0, 1), (True, False, True)
    order = tuple(slice(None, None, -1) if f else slice(None) for f in flip)
    data = np.transpose(case.data, perm)[order]
    head = np.transpose(case.head, perm)[order]
    index_to_old = np.zeros((4, 4))
    index_to_old[3, 3] = 1.0
    for new_axis, old_axis in enumerate(perm):
        n = case.data.shape[old_axis]
        index_to_old[old_axis, new_axis] = -1.0 if flip[new_axis] else 1.0
        index_to_old[old_axis, 3] = n - 1 if flip[new_axis] else 0.0
    affine = case.img.affine @ index_to_old
    seg = segment(data, affine, head, atlas, case.subject_to_atlas)
    expected = np.transpose(case.seg.labels, perm)[order]
    assert np.mean(seg.labels == expected) > 0.999


@pytest.mark.slow
def test_exclusion_mask(cases):
    case = cases(IXI_HEADS[0])
    mask = exclusion_mask(case.seg, case.head)
    assert mask.dtype == bool and mask.shape == case.data.shape
    assert not np.any(mask & ~case.head)
    protected = brain_mask(case.seg.labels) | np.isin(
        case.seg.labels, [SEG_LABELS[c] for c in PROTECTED_CLASSES if c not in ("csf", "gm", "wm")]
    )
    assert np.all(mask[protected & case.head])
    undilated = exclusion_mask(case.seg, case.head, dilate_vox=0)
    assert XMASK_DILATE_VOX == 0 or mask.sum() > undilated.sum()
    # the face is not protected: soft tissue exists outside the mask
    assert np.any((case.seg.labels == SEG_LABELS["soft"]) & ~mask)


def test_rejects_mismatched_inputs(atlas):
    with pytest.raises(ValueError, match="same shape"):
        segment(np.zeros((8, 8, 8)), np.eye(4), np.zeros((8, 8, 9), bool), atlas, np.eye(4))
    with pytest.raises(ValueError, match="empty"):
        segment(np.ones((8, 8, 8)), np.eye(4), np.zeros((8, 8, 8), bool), atlas, np.eye(4))


@pytest.mark.slow
def test_report_cost(cases):
    """Not a timing test: prints segment() time and peak memory; checks the memory budget."""
    for name in (IXI_HEADS[0], COLIN):
        case = cases(name)
        zooms = geometry.voxel_sizes(case.img.affine)
        print(
            f"{name} {case.data.shape} {np.round(zooms, 2)} mm: segment() {case.seconds:.1f} s, "
            f"peak traced memory {case.peak_gb:.2f} GB (working grid {SEGMENT_MM} mm)"
        )
        assert case.peak_gb < MAX_PEAK_MEMORY_GB
