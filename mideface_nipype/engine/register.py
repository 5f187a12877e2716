"""ANTs registration in world (RAS mm) terms: atlas -> subject affine, contrast -> reference rigid.

Also the atlas surface carried into the subject through the registration (``project_surface``).
Heads travel as ``GridImage`` values (image, grid affine, head mask). Everything between steps is
a 4x4 matrix in RAS millimetres, so no step depends on voxel order or orientation. ANTs works in
LPS; the conversion lives here and nowhere else.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.io
from scipy.spatial.transform import Rotation

from mideface_nipype.engine.atlas import Atlas
from mideface_nipype.engine.bracket import FACE_LABEL_NAMES, offset_field
from mideface_nipype.engine.headmask import head_mask
from mideface_nipype.utils.errors import RegistrationError
from mideface_nipype.utils.geometry import (
    GridImage,
    anti_alias,
    apply_affine,
    box_affine,
    centroid_mm,
    iso_grid,
    mask_box,
    resample,
    sample_at,
    smooth_downsample,
    voxel_sizes,
)
from mideface_nipype.utils.io import first_frame
from mideface_nipype.utils.threads import pin_itk_threads

LOGGER = logging.getLogger(__name__)

#: Grid spacing at which registration runs; the affine is as good at 3 mm and ten times cheaper.
REGISTRATION_MM = 3.0
#: Spacing of the coarse grid on which the rotation search ranks its candidates.
SEARCH_MM = 6.0
#: Turn (degrees) about each axis added to every axis rotation in the pose search, so that a head
#: tilted by up to 30 degrees in the scanner still gets a start within reach of ANTs.
SEARCH_TURN_DEG = 30.0
#: When the pose search's start is refused, the search runs once more with every rotation also
#: shifted this far (mm) up and down the moving head's z axis (the atlas's body axis): the
#: starts align the head centroids, and a head that ends at the chin (colin27) has its centroid
#: 22-24 mm from the atlas's, where the starts' scores are flat and a turned head gets a wrong
#: start. Not in the first search: with three times the starts, wrong ones won on IXI012.
SEARCH_SHIFT_MM = 20.0
#: ANTs' pyramid (iterations, shrink factors, smoothing sigmas in voxels) of the first atlas run,
#: from the searched start, and of the refining runs from its result: from a start 20-30 degrees
#: off, one run stops 2-5 mm short at the face. The first run ends at shrink 2: the refining runs
#: do the full grid twice after it, so its own full-grid level (up to 100 iterations on the whole
#: 3 mm grid) bought nothing they do not; without it the atlas registration takes 34 % less CPU
#: over the 9 T1w heads (28.4 against 42.8 s; 1.0-1.8 s a head) and the faces land 0.13-0.50 mm
#: (mean 0.06-0.32 mm) from where the three-level run put them: inside ANTs' own seed-to-seed
#: spread (seeds 1 against 2 and 3: 0.40-1.11 mm with the three levels, 0.46-1.41 without).
ATLAS_PYRAMID = ((200, 200), (4, 2), (2, 1))
REFINE_PYRAMID = ((200, 100), (2, 1), (1, 0))
#: The refining runs start next to the optimum, so they stop once the metric has changed less
#: than this over ``REFINE_WINDOW`` iterations (ANTs' convergence test) instead of running their
#: full count: 2-3 times faster, and the face lands within 0.15 mm of the full count's result.
#: A window of 5 iterations instead of 10 saves 11 % of the atlas registration (0.8 s a head)
#: with the face within 0.37 mm of the 10-iteration result on all 9 T1w heads, and 15-20 % of
#: a coregistration with the same error against the known transform of 27 remaps (max 0.26
#: against 0.29 mm).
REFINE_THRESHOLD = 1e-5
REFINE_WINDOW = 5
#: The first atlas run stops each level once the metric has changed less than ANTs' default 1e-6
#: over 5 iterations. With its full-grid level it stopped at 1e-5 over 10 (0.2-2.6 s less than
#: 1e-6); without that level the coarse levels decide the refining runs' start, and 1e-6 over 5
#: puts the faces closest to the three-level result (0.50 mm at most, against 0.55 for 1e-5 over
#: 10) at the lower cost.
ATLAS_CONVERGENCE = (1e-6, 5)
#: Refining runs on the moving grid. On the subject's own grid, the same head turned or shifted
#: in the world ended 0.5-2 mm apart at the face (it meets the grid differently); two runs on the
#: moving grid bring that to 0.1-0.2 mm (one run: 0.2-0.6 mm).
REFINE_PASSES = 2
#: The refining runs sample the moving head's bounding box and this much air around it, not the
#: moving image's whole grid: outside the head both images are 0 (masked), so the rest of the
#: grid only adds (air, air) samples. On the atlas grid the box is 80 % of the voxels: over the
#: 9 T1w heads the refining runs do 15 % less ANTs work (iterations x voxels), the atlas
#: registration takes 12 % less CPU, and the faces land within the registration's own noise
#: of the whole grid's result (0.44-0.98 mm at most; ANTs seeds 2 and 3 against seed 1 move
#: them 0.37-1.15 mm).
REFINE_MARGIN_MM = 6.0
#: Coregistration of another contrast of the same head (rigid): the first run stops at shrink 2,
#: each level once converged; the refining passes do the full grid. On T2-, PD- and FLAIR-like
#: remaps of 5 heads turned 12-14 degrees it lands as close to the known transform as the atlas's
#: schedule (mean 0.04-0.19 mm, max 0.24 mm), and on the real PD slab of chris_T1w within
#: 0.05 mm of it, for 1.7 s less CPU.
COREG_PYRAMID = ((100, 100), (4, 2), (2, 1))
COREG_CONVERGENCE = (1e-6, 10)
#: Seed for ANTs' metric sampling, so that a run is reproducible.
ANTS_SEED = 1
#: ANTs' linear stage as antspyx sets it up: Mattes MI with 32 bins on a regular 20 % sample,
#: gradient step 0.25.
ANTS_BINS = 32
ANTS_SAMPLING = 0.2
ANTS_GRADIENT_STEP = 0.25
#: Distance (atlas mm) over which the face labels' similarity map blends into the registration's
#: affine (smoothstep inward from the face's edge).
SIMILAR_FACE_TAPER_MM = 18.0
#: The atlas head ends here (MNI z, mm) for registration: below it the atlas holds the chin and
#: jaw, which move with the mouth (relaxed or open, subjects' chins lie 5-20 mm lower than the
#: average head's), so the affine is fitted to the skull and the upper face, as it was before the
#: atlas had its chin; the chin is there for the face labels.
ATLAS_FLOOR_Z_MM = -130.0
#: Registrations whose head-mask overlap ends below this are refused (the atlas missed the head).
MIN_HEAD_DICE = 0.75
#: A pose is refused unless its mutual information with the subject exceeds, by this factor, that
#: of every other axis rotation of it about the moving head (``pose_ratio``): right poses of the
#: real heads score 1.8 to 4.5, heads turned front to back or on their side 0.3 to 0.8. Between
#: the two lie wrong poses: colin27 (its face cut by the box) turned 30-37 degrees in the world
#: registered with its face 24-160 mm off at ratios 1.36-1.50, which 1.3 let through.
MIN_POSE_RATIO = 1.6
#: Below this pose ratio a turned copy fits clearly better: the refusal says so (above it, up to
#: ``MIN_POSE_RATIO``, nothing fits: not a whole head, or another contrast).
TURNED_POSE_RATIO = 0.8
#: The pose ratio scores about this many of the head's samples (every k-th): at 3 mm a head has
#: 110 000-180 000, and a quarter of them fill the 32 x 32 joint histogram as decisively
#: (ratios 2-6 % lower on the development heads, 1.84-4.49) at a quarter of the 24 scorings'
#: cost (0.4-0.7 s less per registration and per coregistration).
POSE_RATIO_SAMPLES = 40_000

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def import_ants():
    """Import antspyx single-threaded (it uses one core anyway; one thread is reproducible)."""
    pin_itk_threads()
    import ants

    # antspyx 0.6 ignores registration(random_seed=...); it passes --random-seed to ANTs only
    # from this setting (set_ants_deterministic would also forbid every non-"Repro" transform)
    ants.config._random_seed = ANTS_SEED
    return ants


def ants_library():
    """antspyx's compiled ANTs library (``ants.lib``) on its own, single-threaded.

    ``import ants`` runs antspyx's ``__init__``, which imports pandas, matplotlib, statsmodels
    and scikit-learn: 1.2-1.7 s in every process, for the one function the engine calls. The
    library is registered as ``ants.lib``, so a later ``import ants`` uses this same module.
    """
    lib = sys.modules.get("ants.lib")
    if lib is not None:
        return lib
    pin_itk_threads()
    spec = importlib.util.find_spec("ants")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("antspyx is not installed (pip install antspyx)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = next(
        (
            folder / f"lib{suffix}"
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if (folder / f"lib{suffix}").exists()
        ),
        None,
    )
    if path is None:
        raise ImportError(f"antspyx's compiled library is missing from {folder}")
    loader = importlib.machinery.ExtensionFileLoader("ants.lib", str(path))
    lib = importlib.util.module_from_spec(
        importlib.util.spec_from_file_location("ants.lib", path, loader=loader)
    )
    loader.exec_module(lib)
    sys.modules["ants.lib"] = lib
    return lib


def _ants_geometry(affine: np.ndarray) -> tuple[tuple, tuple, np.ndarray]:
    """(origin, spacing, direction) in ANTs' LPS terms of an axis-aligned RAS grid (``iso_grid``
    makes them; ANTs images are made on such grids only)."""
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(
        np.diag(affine)[:3] <= 0
    ):
        raise ValueError("ANTs images must be on an axis-aligned RAS grid; resample first")
    lps = _LPS @ affine
    origin = tuple(float(v) for v in lps[:3, 3])
    return origin, tuple(float(v) for v in np.diag(affine)[:3]), np.diag([-1.0, -1.0, 1.0])


def _itk_image(lib, data: np.ndarray, affine: np.ndarray):
    """An ITK float image (library pointer) of an array on an axis-aligned RAS grid, as
    antspyx's ``from_numpy`` makes it, and the buffer it reads (keep it while the image is
    used: ITK does not copy it)."""
    origin, spacing, direction = _ants_geometry(affine)
    buffer = np.ascontiguousarray(np.asarray(data, dtype=np.float32).T)
    image = lib.fromNumpyF3(buffer, buffer.shape[::-1])
    lib.setOrigin(image, origin)
    lib.setSpacing(image, spacing)
    lib.setDirection(image, direction)
    return image, buffer


def to_ants(data: np.ndarray, affine: np.ndarray):
    """An ANTsImage from an array on an axis-aligned RAS grid (as made by ``iso_grid``)."""
    ants = import_ants()
    origin, spacing, direction = _ants_geometry(affine)
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=origin,
        spacing=spacing,
        direction=direction,
    )


def ants_transform_to_ras(path: str | Path) -> np.ndarray:
    """The 4x4 RAS matrix of an ITK/ANTs affine file (maps fixed-space points to moving space).

    The file is MATLAB v4: ``AffineTransform_<float|double>_3_3`` (the 3x3 matrix row by row,
    then the translation) and ``fixed`` (the centre).
    """
    fields = scipy.io.loadmat(str(path))
    (name,) = [k for k in fields if k.startswith("AffineTransform_") and k.endswith("_3_3")]
    params = np.asarray(fields[name], dtype=float).ravel()
    center = np.asarray(fields["fixed"], dtype=float).ravel()
    lin = params[:9].reshape(3, 3)
    trans = params[9:12]
    lps = np.eye(4)
    lps[:3, :3] = lin
    lps[:3, 3] = trans + center - lin @ center
    return _LPS @ lps @ _LPS


def ras_to_ants_transform(matrix: np.ndarray, path: str | Path) -> Path:
    """Write a RAS 4x4 (fixed -> moving points) as an ITK affine file that ANTs can read.

    The parameters are rounded to single precision, as antspyx's ``create_ants_transform`` did
    when it wrote these files (the same bytes, so registrations start where they did).
    """
    lps = _LPS @ matrix @ _LPS
    params = np.r_[lps[:3, :3].ravel(), lps[:3, 3]].astype(np.float32).astype(np.float64)
    scipy.io.savemat(
        str(path),
        {"AffineTransform_double_3_3": params[:, None], "fixed": np.zeros((3, 1))},
        format="4",
    )
    return Path(path)


def _cube_rotations() -> np.ndarray:
    """The 24 proper rotations that map the coordinate axes onto each other, identity first."""
    rots = np.round(Rotation.create_group("O").as_matrix())
    first = int(np.argmin([np.abs(r - np.eye(3)).sum() for r in rots]))
    return np.concatenate([rots[first : first + 1], np.delete(rots, first, axis=0)])


def _search_rotations() -> np.ndarray:
    """The 24 axis rotations, each alone and after a turn of +-``SEARCH_TURN_DEG`` about an axis.

    Identity first; 168 in all, so every pose up to about 30 degrees from an axis-aligned one
    has a candidate within some 25 degrees (the 24 alone leave tilted heads 60-180 degrees off).
    """
    turns = [np.eye(3)] + [
        Rotation.from_rotvec(np.radians(sign * SEARCH_TURN_DEG) * axis).as_matrix()
        for axis in np.eye(3)
        for sign in (-1.0, 1.0)
    ]
    return np.array([rot @ turn for rot in _cube_rotations() for turn in turns])


def _about(rot: np.ndarray, fixed_point: np.ndarray, moving_point: np.ndarray) -> np.ndarray:
    """Matrix mapping fixed-space points to moving space: rotate about ``fixed_point``."""
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = moving_point - rot @ fixed_point
    return m


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two intensity samples (same contrast: sharper than MI)."""
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else -1.0


def _bin_index(values: np.ndarray, bins: int) -> np.ndarray:
    """Each value's bin among ``bins`` equal bins from its minimum to its maximum (the last
    bin closed, a constant sample widened by 0.5 each side), as ``np.histogram`` bins them."""
    lo, hi = values.min(), values.max()
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)  # in the values' precision, as numpy's are
    scale = bins / (float(hi) - float(lo))
    index = np.minimum(((values - float(lo)) * scale).astype(np.intp), bins - 1)
    # the product can miss by one bin within an ulp of an edge (integer intensities sit on
    # edges often): settle against the edges themselves, as np.histogram does
    index -= values < edges[index]
    index += (values >= edges[index + 1]) & (index < bins - 1)
    return index


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Mutual information (nats) of two intensity samples: works across contrasts.

    The joint histogram is counted with ``np.bincount`` (``np.histogram2d`` searches the bin
    edges for every sample: 14 times slower, and the pose search and check call this ~200
    times per coregistration)."""
    pair = _bin_index(np.asarray(a), bins) * bins + _bin_index(np.asarray(b), bins)
    hist = np.bincount(pair, minlength=bins * bins).reshape(bins, bins)
    joint = hist / max(hist.sum(), 1.0)
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def _head_samples(grid: GridImage) -> tuple[np.ndarray, np.ndarray]:
    """The head's values and their RAS points (mm): a pose is scored there only, not on the grid."""
    return grid.data[grid.mask], apply_affine(grid.affine, np.argwhere(grid.mask))


def search_initial_pose(
    fixed: GridImage,
    moving: GridImage,
    score=correlation,
    shifts_mm: tuple[float, ...] = (0.0,),
) -> np.ndarray:
    """The best start for a local optimiser: the scanner header or one of 168 rotations.

    The rotations about the head centroids (``_search_rotations``) cover every way a head can
    lie in the scanner (supine, prone, decubitus, a sagittal or coronal acquisition with a wrong
    header, each tilted up to 30 degrees); the header itself wins when the two images already
    share a scanner space (a partial field of view moves the centroid). Ranked by ``score``
    (``correlation`` for the same contrast, ``mutual_information`` across contrasts) over the
    fixed head on a coarse grid (both as made by ``masked_grid``). Each rotation is tried at
    each of ``shifts_mm`` along the moving head's z axis.
    """
    fc = centroid_mm(fixed.mask, fixed.affine)
    mc = centroid_mm(moving.mask, moving.affine)
    candidates = [np.eye(4)] + [
        _about(rot, fc, mc + (0.0, 0.0, shift))
        for rot in _search_rotations()
        for shift in shifts_mm
    ]
    inside, points = _head_samples(fixed)
    scores = [
        score(inside, sample_at(moving.data, moving.affine, apply_affine(cand, points)))
        for cand in candidates
    ]
    best = int(np.argmax(scores))
    LOGGER.info("pose search: best %d, score %.3f (header %.3f)", best, scores[best], scores[0])
    return candidates[best]


def register_affine(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    *,
    initial: np.ndarray,
    transform: str = "Affine",
    metric: str = "mattes",
    pyramid: tuple[tuple[int, ...], ...] = ATLAS_PYRAMID,
    convergence: tuple[float, int] | None = None,
) -> np.ndarray:
    """ANTs affine (or rigid) registration from a RAS initial matrix; returns fixed->moving RAS.

    antsRegistration runs in antspyx's library (``ants_library``) with antspyx's settings for a
    linear stage: the matrices antspyx's ``registration()`` gives, without importing antspyx.
    Both images must be on axis-aligned RAS grids (``smooth_downsample`` makes them).
    ``convergence`` (threshold, window) lets ANTs stop a level early; without it each level runs
    its full count.
    """
    iterations, shrink_factors, smoothing_sigmas = pyramid
    counts = "x".join(str(n) for n in iterations)
    if convergence is not None:
        counts = f"[{counts},{convergence[0]:g},{convergence[1]}]"
    lib = ants_library()
    fixed_img, fixed_buffer = _itk_image(lib, fixed, fixed_affine)
    moving_img, moving_buffer = _itk_image(lib, moving, moving_affine)
    with tempfile.TemporaryDirectory(prefix="mideface-reg-") as tmp:
        init_path = ras_to_ants_transform(initial, Path(tmp) / "init.mat")
        prefix = str(Path(tmp) / "reg_")
        # antsRegistration's arguments as antspyx's registration() passes them for a linear
        # transform, without its two warped images (nothing here reads them)
        images = f"{lib.ptrstr(fixed_img)},{lib.ptrstr(moving_img)}"
        args = [
            "--dimensionality", "3",
            "-r", str(init_path),
            "--metric", f"{metric}[{images},1,{ANTS_BINS},regular,{ANTS_SAMPLING}]",
            "--transform", f"{transform}[{ANTS_GRADIENT_STEP}]",
            "--convergence", counts,
            "--smoothing-sigmas", "x".join(str(v) for v in smoothing_sigmas),
            "--shrink-factors", "x".join(str(v) for v in shrink_factors),
            "-u", "0",
            "-z", "1",
            "--output", f"[{prefix}]",
            "-x", "[NA,NA]",
            "--random-seed", str(ANTS_SEED),
            "--float", "1",
            "--write-composite-transform", "0",
        ]  # fmt: skip
        status = lib.antsRegistration(args)
        del fixed_buffer, moving_buffer  # the images read these until here
        if status != 0:
            raise RuntimeError(f"antsRegistration failed (exit status {status})")
        # the initial transform is composed into the output affine (-z 1)
        return ants_transform_to_ras(prefix + "0GenericAffine.mat")


@dataclass(frozen=True)
class Refusal:
    """How a refused registration's message names what was registered onto the image, what
    cannot be done, and what to try."""

    moving: str
    consequence: str
    advice: str


#: The atlas registration of the head being defaced.
ATLAS_REFUSAL = Refusal(
    "the atlas",
    "the face cannot be placed",
    "try --init-reg with a 4x4 subject->atlas matrix near the right pose, or --no-samseg, and "
    "check that the image is a whole, unmasked head of T1-weighted contrast",
)
#: The coregistration of another contrast (``--apply-to``) to the reference head: --init-reg
#: and --no-samseg do not reach it.
COREG_REFUSAL = Refusal(
    "the reference head",
    "the face mask cannot be carried to this image",
    "check that this image is a whole, unmasked head of the same person as the reference (--i), "
    "from the same session",
)


def head_dice(fixed: GridImage, moving: GridImage, fixed_to_moving: np.ndarray) -> float:
    """Dice of the fixed head mask and the moving head mask pulled through the transform."""
    warped = resample(
        moving.mask.astype(np.float32),
        moving.affine,
        fixed.mask.shape,
        fixed.affine,
        target_to_source=fixed_to_moving,
    )
    warped = warped > 0.5
    both = np.count_nonzero(warped & fixed.mask)
    return 2.0 * both / max(1, np.count_nonzero(warped) + np.count_nonzero(fixed.mask))


def pose_ratio(fixed: GridImage, moving: GridImage, fixed_to_moving: np.ndarray) -> float:
    """Mutual information of a pose over the best of its 23 axis-rotated alternatives.

    A head is nearly an ellipsoid, so the head-mask Dice of a head turned front to back or on its
    side stays near 0.9; the interior (brain, skull, face, neck) does not fit when turned, so the
    right pose explains the subject clearly better than any turned copy and a wrong one does not.
    Mutual information, not correlation, so that other contrasts (PD, T2) are judged alike;
    over about ``POSE_RATIO_SAMPLES`` of the head's samples.
    """
    centre = centroid_mm(moving.mask, moving.affine)
    inside, points = _head_samples(fixed)
    step = max(1, len(inside) // POSE_RATIO_SAMPLES)
    inside, points = inside[::step], points[::step]

    def score(matrix: np.ndarray) -> float:
        warped = sample_at(moving.data, moving.affine, apply_affine(matrix, points))
        return mutual_information(inside, warped)

    turned = [_about(rot, centre, centre) @ fixed_to_moving for rot in _cube_rotations()[1:]]
    best_other = max(score(matrix) for matrix in turned)
    return score(fixed_to_moving) / max(best_other, 1e-12)


def check_registration(
    fixed: GridImage,
    moving: GridImage,
    fixed_to_moving: np.ndarray,
    *,
    min_head_dice: float = MIN_HEAD_DICE,
    min_pose_ratio: float = MIN_POSE_RATIO,
    refusal: Refusal = ATLAS_REFUSAL,
) -> tuple[float, float]:
    """Head-mask Dice and ``pose_ratio`` of a registration; ``RegistrationError`` if either fails
    (worded by ``refusal``).

    Inputs are the masked images and head masks on the axis-aligned grids registration ran on.
    ``min_pose_ratio`` 0 turns the pose check off, and the ratio (24 scorings of the head, a
    third of a second at 3 mm) is then not computed: NaN.
    """
    dice = head_dice(fixed, moving, fixed_to_moving)
    if dice < min_head_dice:
        raise RegistrationError(
            f"after registration the head mask of {refusal.moving} overlaps this head's mask "
            f"with Dice {dice:.2f} (< {min_head_dice}): {refusal.moving} did not land on the "
            f"head, nothing was defaced; {refusal.advice}"
        )
    if min_pose_ratio <= 0:
        return dice, float("nan")
    ratio = pose_ratio(fixed, moving, fixed_to_moving)
    if ratio < min_pose_ratio:
        seen = (
            f"an axis-turned copy of {refusal.moving} fits this image clearly better than the "
            "registered pose (heads turned in their header score 0.3 to 0.8)"
            if ratio < TURNED_POSE_RATIO
            else f"{refusal.moving}, registered, fits this image no better than axis-turned "
            "copies of it (a whole T1w head scores 1.8 to 4.5)"
        )
        raise RegistrationError(
            f"{seen}: pose ratio {ratio:.2f} < {min_pose_ratio}, so {refusal.consequence} and "
            f"nothing was defaced; {refusal.advice}"
        )
    return dice, ratio


def anti_aliased_head(head: GridImage, spacing_mm: float) -> np.ndarray:
    """The head (zero outside its mask) on its own grid, smoothed for sampling at ``spacing_mm``."""
    return anti_alias(
        np.where(head.mask > 0, head.data, 0).astype(np.float32), head.affine, spacing_mm
    )


def masked_grid(
    head: GridImage, spacing_mm: float, smoothed: np.ndarray | None = None
) -> GridImage:
    """The head (zero outside its mask) and its mask on an axis-aligned RAS ``spacing_mm`` grid.

    ``smoothed`` is the head's ``anti_aliased_head`` for ``spacing_mm`` when already made.
    """
    if smoothed is None:
        smoothed = anti_aliased_head(head, spacing_mm)
    shape, grid_affine = iso_grid(head.data.shape, head.affine, spacing_mm)
    image = resample(smoothed, head.affine, shape, grid_affine)
    mask = smooth_downsample(head.mask.astype(np.float32), head.affine, spacing_mm)[0] > 0.5
    return GridImage(image, grid_affine, mask)


@dataclass(frozen=True)
class HeadGrids:
    """A head as registration reads it: ``masked_grid`` at the registration spacing and, for
    the pose search, at ``SEARCH_MM`` (None when no search is needed); ``smoothed``, its
    ``anti_aliased_head`` at the registration spacing that made the first grid (None when the
    grids were read from files): when this head is the fixed one the refinement resamples it
    (0.2 s to smooth a 1 mm head again)."""

    registration: GridImage
    search: GridImage | None
    smoothed: np.ndarray | None = field(default=None, repr=False, compare=False)


def head_grids(
    head: GridImage, registration_mm: float = REGISTRATION_MM, *, search: bool = True
) -> HeadGrids:
    """``HeadGrids`` of a head: made once, they serve its atlas registration and the
    coregistration of each other contrast to it (a 1 mm head's smoothing costs 0.8 s)."""
    smoothed = anti_aliased_head(head, registration_mm)
    return HeadGrids(
        masked_grid(head, registration_mm, smoothed),
        masked_grid(head, SEARCH_MM) if search else None,
        smoothed,
    )


def register_heads(
    fixed: GridImage,
    moving: HeadGrids,
    *,
    transform: str = "Affine",
    registration_mm: float = REGISTRATION_MM,
    min_head_dice: float = MIN_HEAD_DICE,
    min_pose_ratio: float = MIN_POSE_RATIO,
    initial: np.ndarray | None = None,
    score=correlation,
    pyramid: tuple[tuple[int, ...], ...] = ATLAS_PYRAMID,
    convergence: tuple[float, int] | None = None,
    fixed_grids: HeadGrids | None = None,
    refusal: Refusal = ATLAS_REFUSAL,
) -> tuple[np.ndarray, float]:
    """Register two heads; return the fixed->moving RAS matrix and the head-mask Dice it reaches.

    The fixed head is an image on its own grid with its head mask, brought to ``registration_mm``
    (``head_grids``, unless ``fixed_grids`` are given); the moving head comes as its grids.
    ``search_initial_pose`` picks the start on the ``SEARCH_MM`` grids unless ``initial`` is
    given, then ANTs optimises a ``transform`` ("Affine" or "Rigid", Mattes MI; ``pyramid`` and
    ``convergence`` as in ``register_affine``) and refines it ``REFINE_PASSES`` times on the
    moving grid's box around its head (``REFINE_MARGIN_MM``). Raises ``RegistrationError`` when
    the head masks overlap less than ``min_head_dice`` afterwards or the pose ratio is below
    ``min_pose_ratio`` (``check_registration``, worded by ``refusal``; 0 turns that check off);
    a searched start that is refused gets one more search, its starts also shifted by
    ``SEARCH_SHIFT_MM`` along the moving z, and a new start is fitted and checked alike (the
    first refusal is raised if that one fails too).
    """
    f_grids = fixed_grids or head_grids(fixed, registration_mm, search=initial is None)
    f_grid, m_grid = f_grids.registration, moving.registration
    # the refining runs sample the moving head's box and the fixed head pulled onto it
    box = mask_box(m_grid.mask, round(REFINE_MARGIN_MM / voxel_sizes(m_grid.affine)[0]))
    m, m_aff = m_grid.data[box], box_affine(m_grid.affine, box)
    smoothed = f_grids.smoothed
    if smoothed is None:
        smoothed = anti_aliased_head(fixed, registration_mm)

    def fit(start: np.ndarray) -> tuple[np.ndarray, float]:
        matrix = register_affine(
            f_grid.data,
            f_grid.affine,
            m_grid.data,
            m_grid.affine,
            initial=start,
            transform=transform,
            pyramid=pyramid,
            convergence=convergence,
        )
        # then refine with the fixed head pulled into the moving head's frame: both images sit
        # on the moving grid whatever the fixed head's orientation, position and voxel grid, so
        # the result no longer depends on how the fixed head meets its own registration grid
        for _ in range(REFINE_PASSES):
            pulled = resample(
                smoothed, fixed.affine, m.shape, m_aff, target_to_source=np.linalg.inv(matrix)
            )
            correction = register_affine(
                pulled,
                m_aff,
                m,
                m_aff,
                initial=np.eye(4),
                transform=transform,
                pyramid=REFINE_PYRAMID,
                convergence=(REFINE_THRESHOLD, REFINE_WINDOW),
            )
            matrix = correction @ matrix
        dice, ratio = check_registration(
            f_grid,
            m_grid,
            matrix,
            min_head_dice=min_head_dice,
            min_pose_ratio=min_pose_ratio,
            refusal=refusal,
        )
        pose = "not checked" if np.isnan(ratio) else f"{ratio:.2f}"
        LOGGER.info("%s registration: head Dice %.3f, pose ratio %s", transform, dice, pose)
        return matrix, dice

    if initial is not None:
        return fit(initial)
    start = search_initial_pose(f_grids.search, moving.search, score=score)
    try:
        return fit(start)
    except RegistrationError as refused:
        shifts = (-SEARCH_SHIFT_MM, 0.0, SEARCH_SHIFT_MM)
        again = search_initial_pose(f_grids.search, moving.search, score=score, shifts_mm=shifts)
        if np.array_equal(again, start):
            raise
        LOGGER.info("refused (%s); the pose search again, its starts shifted along z", refused)
        try:
            return fit(again)
        except RegistrationError as refused_again:
            LOGGER.info("refused again (%s)", refused_again)
            raise refused from None


def atlas_head(atlas: Atlas) -> GridImage:
    """The atlas head as registration sees it: its image and mask at or above
    ``ATLAS_FLOOR_Z_MM`` (the atlas grid is axis-aligned RAS, slices run up from its floor)."""
    head = atlas.head_image()
    first = np.ceil((ATLAS_FLOOR_Z_MM - head.affine[2, 3]) / head.affine[2, 2] - 1e-6)
    box = (slice(None), slice(None), slice(max(0, int(first)), None))
    return GridImage(head.data[box], box_affine(head.affine, box), head.mask[box])


def register_atlas(
    subject: GridImage,
    atlas: Atlas,
    *,
    registration_mm: float = REGISTRATION_MM,
    convergence: tuple[float, int] | None = ATLAS_CONVERGENCE,
    **kwargs,
) -> tuple[np.ndarray, float]:
    """Affine from subject world to atlas (MNI) world, and the head-mask Dice it reaches.

    ``subject`` is the head image (frame 0) with its head mask; ``kwargs`` go to
    ``register_heads``.
    """
    return register_heads(
        subject,
        head_grids(atlas_head(atlas), registration_mm),
        registration_mm=registration_mm,
        convergence=convergence,
        **kwargs,
    )


def coregister(
    img: nib.spatialimages.SpatialImage, reference: HeadGrids, **kwargs
) -> tuple[np.ndarray, float]:
    """Rigid map from another contrast's world to the reference's world (mutual information).

    The other contrast's head mask is made here (``headmask.head_mask``, frame 0); ``reference``
    is the reference head's grids (``head_grids``, as its atlas registration made them).
    ``kwargs`` go to ``register_heads``.
    """
    moving_head = np.asarray(head_mask(img).dataobj) > 0
    return register_heads(
        GridImage(first_frame(img), img.affine, moving_head),
        reference,
        transform="Rigid",
        score=mutual_information,
        pyramid=COREG_PYRAMID,
        convergence=COREG_CONVERGENCE,
        refusal=COREG_REFUSAL,
        **kwargs,
    )


def similarity_part(matrix: np.ndarray) -> tuple[np.ndarray, float]:
    """The rotation (a reflection included, as the matrix has it) and the isotropic scale
    (cube root of the volume change) nearest to the linear part of a 4x4 affine."""
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    return u @ vt, float(np.cbrt(abs(np.linalg.det(matrix[:3, :3]))))


def project_surface(
    atlas: Atlas, subject_to_atlas: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The atlas head surface in the subject's world (mm) through the registration.

    The face labels are moved by the registration's similarity part about their centroid
    instead (``similarity_part``), blending into the full affine over ``SIMILAR_FACE_TAPER_MM``
    inside their edge: the affine's shear and unequal scales fit the subject's face proportions
    (its width against its height, the chin's angle), which a face-recognition attacker reads
    back from the defaced skin; the similarity keeps the average face's proportions at the
    subject's size. Outside the face every vertex follows the affine.

    Returns the vertices, the triangles (their winding reversed when the map reflects, so that
    they stay wound outward) and each vertex's region as in the label file (index in
    ``atlas.labels`` + 1, 0 unlabelled).
    """
    atlas_to_subject = np.linalg.inv(subject_to_atlas)
    atlas_vertices = np.asarray(atlas.surface.vertices, dtype=float)
    faces = np.asarray(atlas.surface.faces)
    vertices = apply_affine(atlas_to_subject, atlas_vertices)
    face = atlas.in_labels(FACE_LABEL_NAMES)
    if face.any():
        rotation, scale = similarity_part(atlas_to_subject)
        centre = atlas_vertices[face].mean(axis=0)
        similar = apply_affine(atlas_to_subject, centre[None])[0] + scale * (
            (atlas_vertices - centre) @ rotation.T
        )
        weight = offset_field(atlas_vertices, face, faces, 1.0, SIMILAR_FACE_TAPER_MM)
        vertices += weight[:, None] * (similar - vertices)
    if np.linalg.det(atlas_to_subject[:3, :3]) < 0:
        faces = faces[:, ::-1]  # a reflection turns the winding inside out
    regions = np.zeros(len(vertices), dtype=np.int32)
    for i, idx in enumerate(atlas.labels.values()):
        regions[idx] = i + 1
    return vertices, faces, regions
