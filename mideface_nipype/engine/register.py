"""ANTs registration in world (RAS mm) terms: atlas -> subject affine, contrast -> reference rigid.

Everything between steps is a 4x4 matrix in RAS millimetres, so no step depends on voxel order or
orientation. ANTs works in LPS; the conversion lives here and nowhere else.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from mideface_nipype.utils.threads import pin_itk_threads

LOGGER = logging.getLogger(__name__)

#: Grid spacing at which registration runs; the affine is as good at 3 mm and ten times cheaper.
REGISTRATION_MM = 3.0
#: Spacing of the coarse grid on which the rotation search ranks its candidates.
SEARCH_MM = 6.0
#: Turn (degrees) about each axis added to every axis rotation in the pose search, so that a head
#: tilted by up to 30 degrees in the scanner still gets a start within reach of ANTs.
SEARCH_TURN_DEG = 30.0
#: ANTs' pyramid (iterations, shrink factors, smoothing sigmas in voxels) for the first run, and
#: for the refining runs at the two finest levels from its result: from a start 20-30 degrees
#: off, one run stops 2-5 mm short at the face.
FULL_PYRAMID = ((200, 200, 100), (4, 2, 1), (2, 1, 0))
REFINE_PYRAMID = ((200, 100), (2, 1), (1, 0))
#: The refining runs start next to the optimum, so they stop once the metric has changed less
#: than this over ``REFINE_WINDOW`` iterations (ANTs' convergence test) instead of running their
#: full count: 2-3 times faster, and the face lands within 0.15 mm of the full count's result.
REFINE_THRESHOLD = 1e-5
REFINE_WINDOW = 10
#: Refining runs on the moving grid. On the subject's own grid, the same head turned or shifted
#: in the world ended 0.5-2 mm apart at the face (it meets the grid differently); two runs on the
#: moving grid bring that to 0.1-0.2 mm (one run: 0.2-0.6 mm).
REFINE_PASSES = 2
#: Seed for ANTs' metric sampling, so that a run is reproducible.
ANTS_SEED = 1
#: Registrations whose head-mask overlap ends below this are refused (the atlas missed the head).
MIN_HEAD_DICE = 0.75
#: A pose is refused unless its mutual information with the subject exceeds, by this factor, that
#: of every other axis rotation of it about the moving head (``pose_ratio``): right poses of the
#: real heads score 1.8 to 4.9, heads turned front to back or on their side 0.3 to 0.8.
MIN_POSE_RATIO = 1.3
#: Below this pose ratio a turned copy fits clearly better: the refusal says so (above it, up to
#: ``MIN_POSE_RATIO``, nothing fits: not a whole head, or another contrast).
TURNED_POSE_RATIO = 0.8

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _import_ants():
    """Import antspyx single-threaded (it uses one core anyway; one thread is reproducible)."""
    pin_itk_threads()
    import ants

    # antspyx 0.6 ignores registration(random_seed=...); it passes --random-seed to ANTs only
    # from this setting (set_ants_deterministic would also forbid every non-"Repro" transform)
    ants.config._random_seed = ANTS_SEED
    return ants


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths in mm (column norms of the affine), whatever the orientation."""
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 3) points through a 4x4 matrix."""
    points = np.asarray(points, dtype=float)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def iso_grid(
    shape: tuple[int, ...], affine: np.ndarray, spacing_mm: float
) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axis-aligned RAS grid of ``spacing_mm`` covering the field of view of (shape, affine)."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1)
    world = apply_affine(affine, corners.T)
    lo, hi = world.min(0), world.max(0)
    new_shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing_mm).astype(int) + 1)
    new_affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    new_affine[:3, 3] = lo
    return new_shape, new_affine


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, ...],
    target_affine: np.ndarray,
    *,
    target_to_source: np.ndarray | None = None,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Sample ``data`` on a target grid; ``target_to_source`` maps target world mm to source mm."""
    vox = np.linalg.inv(affine) @ (np.eye(4) if target_to_source is None else target_to_source)
    vox = vox @ target_affine
    if order > 1:
        data = ndi.spline_filter(np.asarray(data, dtype=np.float32), order=order)
    return ndi.affine_transform(
        np.asarray(data, dtype=np.float32),
        vox[:3, :3],
        offset=vox[:3, 3],
        output_shape=tuple(shape[:3]),
        order=order,
        mode="constant",
        cval=cval,
        prefilter=False,
    )


def anti_alias(data: np.ndarray, affine: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The volume smoothed so that sampling it every ``spacing_mm`` does not alias."""
    zooms = voxel_sizes(affine)
    sigma_vox = np.sqrt(np.clip((spacing_mm / zooms) ** 2 - 1.0, 0.0, None)) / 2.355
    return ndi.gaussian_filter(np.asarray(data, dtype=np.float32), sigma_vox)


def smooth_downsample(
    data: np.ndarray, affine: np.ndarray, spacing_mm: float, *, order: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased resampling of a volume onto an axis-aligned RAS grid of ``spacing_mm``."""
    shape, new_affine = iso_grid(data.shape, affine, spacing_mm)
    smoothed = anti_alias(data, affine, spacing_mm)
    return resample(smoothed, affine, shape, new_affine, order=order), new_affine


def to_ants(data: np.ndarray, affine: np.ndarray):
    """An ANTsImage from an array on an axis-aligned RAS grid (as made by ``iso_grid``)."""
    ants = _import_ants()
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(
        np.diag(affine)[:3] <= 0
    ):
        raise ValueError("to_ants expects an axis-aligned RAS grid; resample first")
    lps = _LPS @ affine
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(float(v) for v in lps[:3, 3]),
        spacing=tuple(float(v) for v in np.diag(affine)[:3]),
        direction=np.diag([-1.0, -1.0, 1.0]),
    )


def ants_transform_to_ras(path: str | Path) -> np.ndarray:
    """The 4x4 RAS matrix of an ITK/ANTs affine file (maps fixed-space points to moving space)."""
    ants = _import_ants()
    tx = ants.read_transform(str(path))
    params = np.asarray(tx.parameters, dtype=float)
    center = np.asarray(tx.fixed_parameters, dtype=float)
    lin = params[:9].reshape(3, 3)
    trans = params[9:12]
    lps = np.eye(4)
    lps[:3, :3] = lin
    lps[:3, 3] = trans + center - lin @ center
    return _LPS @ lps @ _LPS


def ras_to_ants_transform(matrix: np.ndarray, path: str | Path) -> Path:
    """Write a RAS 4x4 (fixed -> moving points) as an ITK affine file that ANTs can read."""
    ants = _import_ants()
    lps = _LPS @ matrix @ _LPS
    tx = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=3,
        matrix=lps[:3, :3],
        offset=lps[:3, 3],
    )
    ants.write_transform(tx, str(path))
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


def _centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return apply_affine(affine, np.argwhere(mask).mean(0)[None])[0]


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


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Mutual information (nats) of two intensity samples: works across contrasts."""
    hist, _, _ = np.histogram2d(a, b, bins=bins)
    joint = hist / max(hist.sum(), 1.0)
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def search_initial_pose(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    fixed_mask: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    moving_mask: np.ndarray,
    score=correlation,
) -> np.ndarray:
    """The best start for a local optimiser: the scanner header or one of 168 rotations.

    The rotations about the head centroids (``_search_rotations``) cover every way a head can
    lie in the scanner (supine, prone, decubitus, a sagittal or coronal acquisition with a wrong
    header, each tilted up to 30 degrees); the header itself wins when the two images already
    share a scanner space (a partial field of view moves the centroid). Ranked by ``score``
    (``correlation`` for the same contrast, ``mutual_information`` across contrasts) over the
    fixed head on a coarse grid.
    """
    fc = _centroid(fixed_mask, fixed_affine)
    mc = _centroid(moving_mask, moving_affine)
    candidates = [np.eye(4)] + [_about(rot, fc, mc) for rot in _search_rotations()]
    scores = []
    for cand in candidates:
        warped = resample(moving, moving_affine, fixed.shape, fixed_affine, target_to_source=cand)
        scores.append(score(fixed[fixed_mask], warped[fixed_mask]))
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
    pyramid: tuple[tuple[int, ...], ...] = FULL_PYRAMID,
    convergence: tuple[float, int] | None = None,
) -> np.ndarray:
    """ANTs affine (or rigid) registration from a RAS initial matrix; returns fixed->moving RAS.

    Both images must be on axis-aligned RAS grids (``smooth_downsample`` makes them).
    ``convergence`` (threshold, window) lets ANTs stop a level early; without it each level runs
    its full count.
    """
    iterations, shrink_factors, smoothing_sigmas = pyramid
    if convergence is not None:
        iterations = _ants_convergence(iterations, *convergence)
    ants = _import_ants()
    fixed_img = to_ants(fixed, fixed_affine)
    moving_img = to_ants(moving, moving_affine)
    with tempfile.TemporaryDirectory(prefix="mideface-reg-") as tmp:
        init_path = ras_to_ants_transform(initial, Path(tmp) / "init.mat")
        result = ants.registration(
            fixed_img,
            moving_img,
            type_of_transform=transform,
            initial_transform=[str(init_path)],
            aff_metric=metric,
            aff_iterations=iterations,
            aff_shrink_factors=shrink_factors,
            aff_smoothing_sigmas=smoothing_sigmas,
            outprefix=str(Path(tmp) / "reg_"),
        )
        fwd = [p for p in result["fwdtransforms"] if p.endswith(".mat")]
        # antspyx composes the initial transform into its output affine.
        return ants_transform_to_ras(fwd[-1])


def _ants_convergence(
    iterations: tuple[int, ...], threshold: float, window: int
) -> tuple[str, ...]:
    """Iteration counts that antspyx joins with "x" into ANTs' ``[NxM,threshold,window]``."""
    counts = [str(n) for n in iterations]
    counts[0] = "[" + counts[0]
    counts[-1] = f"{counts[-1]},{threshold:g},{window}]"
    return tuple(counts)


class RegistrationError(RuntimeError):
    """The atlas did not land on the head; defacing would cut the wrong place."""


#: What a refused registration's message suggests.
_TRY = (
    "try --init-reg with a 4x4 subject->atlas matrix near the right pose, or --no-samseg, and "
    "check that the image is a whole, unmasked head of T1-weighted contrast"
)


def head_dice(
    fixed_mask: np.ndarray,
    fixed_affine: np.ndarray,
    moving_mask: np.ndarray,
    moving_affine: np.ndarray,
    fixed_to_moving: np.ndarray,
) -> float:
    """Dice of the fixed head mask and the moving head mask pulled through the transform."""
    warped = resample(
        moving_mask.astype(np.float32),
        moving_affine,
        fixed_mask.shape,
        fixed_affine,
        target_to_source=fixed_to_moving,
    )
    warped = warped > 0.5
    both = np.count_nonzero(warped & fixed_mask)
    return 2.0 * both / max(1, np.count_nonzero(warped) + np.count_nonzero(fixed_mask))


def pose_ratio(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    fixed_mask: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    moving_mask: np.ndarray,
    fixed_to_moving: np.ndarray,
) -> float:
    """Mutual information of a pose over the best of its 23 axis-rotated alternatives.

    A head is nearly an ellipsoid, so the head-mask Dice of a head turned front to back or on its
    side stays near 0.9; the interior (brain, skull, face, neck) does not fit when turned, so the
    right pose explains the subject clearly better than any turned copy and a wrong one does not.
    Mutual information, not correlation, so that other contrasts (PD, T2) are judged alike.
    """
    centre = _centroid(moving_mask, moving_affine)
    inside = fixed[fixed_mask]

    def score(matrix: np.ndarray) -> float:
        warped = resample(moving, moving_affine, fixed.shape, fixed_affine, target_to_source=matrix)
        return mutual_information(inside, warped[fixed_mask])

    turned = [_about(rot, centre, centre) @ fixed_to_moving for rot in _cube_rotations()[1:]]
    best_other = max(score(matrix) for matrix in turned)
    return score(fixed_to_moving) / max(best_other, 1e-12)


def check_registration(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    fixed_mask: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    moving_mask: np.ndarray,
    fixed_to_moving: np.ndarray,
    *,
    min_head_dice: float = MIN_HEAD_DICE,
    min_pose_ratio: float = MIN_POSE_RATIO,
) -> tuple[float, float]:
    """Head-mask Dice and ``pose_ratio`` of a registration; ``RegistrationError`` if either fails.

    Inputs are the masked images and head masks on the axis-aligned grids registration ran on.
    """
    dice = head_dice(fixed_mask, fixed_affine, moving_mask, moving_affine, fixed_to_moving)
    if dice < min_head_dice:
        raise RegistrationError(
            f"after registration the atlas head mask overlaps this head's mask with Dice "
            f"{dice:.2f} (< {min_head_dice}): the atlas did not land on the head, nothing was "
            f"defaced; {_TRY}"
        )
    ratio = pose_ratio(
        fixed, fixed_affine, fixed_mask, moving, moving_affine, moving_mask, fixed_to_moving
    )
    if ratio < min_pose_ratio:
        seen = (
            "an axis-turned copy of the atlas fits this image clearly better than the registered "
            "pose (heads turned in their header score 0.3 to 0.8)"
            if ratio < TURNED_POSE_RATIO
            else "the registered atlas fits this image no better than axis-turned copies of it "
            "(a whole T1w head scores 1.8 to 4.9)"
        )
        raise RegistrationError(
            f"{seen}: pose ratio {ratio:.2f} < {min_pose_ratio}, so the face cannot be placed and "
            f"nothing was defaced; {_TRY}"
        )
    return dice, ratio


def masked_grid(
    data: np.ndarray, affine: np.ndarray, head: np.ndarray, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The head (zero outside its mask), its RAS grid affine and mask, at ``spacing_mm``."""
    masked = np.where(head > 0, data, 0).astype(np.float32)
    image, image_aff = smooth_downsample(masked, affine, spacing_mm)
    mask = smooth_downsample(head.astype(np.float32), affine, spacing_mm)[0] > 0.5
    return image, image_aff, mask


def register_heads(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    fixed_head: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    moving_head: np.ndarray,
    *,
    transform: str = "Affine",
    registration_mm: float = REGISTRATION_MM,
    min_head_dice: float = MIN_HEAD_DICE,
    min_pose_ratio: float = MIN_POSE_RATIO,
    initial: np.ndarray | None = None,
    score=correlation,
) -> tuple[np.ndarray, float]:
    """Register two heads; return the fixed->moving RAS matrix and the head-mask Dice it reaches.

    Both heads (masked) are brought to ``registration_mm`` RAS grids; ``search_initial_pose``
    picks the start on a ``SEARCH_MM`` grid unless ``initial`` is given, then ANTs optimises a
    ``transform`` ("Affine" or "Rigid", Mattes MI) and refines it ``REFINE_PASSES`` times on the
    moving grid. Raises ``RegistrationError`` when the head masks overlap less than
    ``min_head_dice`` afterwards or the pose ratio is below ``min_pose_ratio``
    (``check_registration``; 0 turns that check off).
    """
    f, f_aff, f_mask = masked_grid(fixed, fixed_affine, fixed_head, registration_mm)
    m, m_aff, m_mask = masked_grid(moving, moving_affine, moving_head, registration_mm)
    if initial is None:
        initial = search_initial_pose(
            *masked_grid(fixed, fixed_affine, fixed_head, SEARCH_MM),
            *masked_grid(moving, moving_affine, moving_head, SEARCH_MM),
            score=score,
        )
    matrix = register_affine(f, f_aff, m, m_aff, initial=initial, transform=transform)
    # then refine with the fixed head pulled into the moving head's frame: both images sit on the
    # moving grid whatever the fixed head's orientation, position and voxel grid, so the result
    # no longer depends on how the fixed head meets its own registration grid
    smoothed = anti_alias(np.where(fixed_head > 0, fixed, 0), fixed_affine, registration_mm)
    for _ in range(REFINE_PASSES):
        pulled = resample(
            smoothed, fixed_affine, m.shape, m_aff, target_to_source=np.linalg.inv(matrix)
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
        f,
        f_aff,
        f_mask,
        m,
        m_aff,
        m_mask,
        matrix,
        min_head_dice=min_head_dice,
        min_pose_ratio=min_pose_ratio,
    )
    LOGGER.info("%s registration: head Dice %.3f, pose ratio %.2f", transform, dice, ratio)
    return matrix, dice


def register_atlas(
    data: np.ndarray,
    affine: np.ndarray,
    head: np.ndarray,
    atlas_head: np.ndarray,
    atlas_affine: np.ndarray,
    atlas_mask: np.ndarray,
    **kwargs,
) -> tuple[np.ndarray, float]:
    """Affine from subject world to atlas (MNI) world, and the head-mask Dice it reaches."""
    return register_heads(data, affine, head, atlas_head, atlas_affine, atlas_mask, **kwargs)


def coregister(
    data: np.ndarray,
    affine: np.ndarray,
    head: np.ndarray,
    ref_data: np.ndarray,
    ref_affine: np.ndarray,
    ref_head: np.ndarray,
    **kwargs,
) -> tuple[np.ndarray, float]:
    """Rigid map from another contrast's world to the reference's world (mutual information)."""
    return register_heads(
        data,
        affine,
        head,
        ref_data,
        ref_affine,
        ref_head,
        transform="Rigid",
        score=mutual_information,
        **kwargs,
    )
