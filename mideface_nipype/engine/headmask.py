"""Binary head mask with the scan-line algorithm of FreeSurfer's ``mri_seghead``.

MiDeFace only edits voxels near the head surface, so it needs a mask of the whole head (scalp, face,
nose, ears) that is closed: dark tissue inside the head (sinuses, airway, mouth with dental signal
loss) must be inside. The scan-line fill along the three array axes provides exactly that, and
because it works on array axes it is independent of the image orientation. Written from the
description in ``docs/mideface-algorithm.md`` section 2.5, not from FreeSurfer code.
"""

import itertools

import nibabel as nib
import numpy as np
from scipy import ndimage

from mideface_nipype.utils.errors import NoHeadError
from mideface_nipype.utils.geometry import mask_box

THRESH1 = 20
"""Scan-line threshold on the 0..255 rescaled image (air is below it, tissue above)."""
THRESH2 = 20
"""Flood-fill threshold: voxels with ``255 - intensity <= THRESH2`` join the region too."""
NHITS_MIN = 2
"""Consecutive voxels above ``THRESH1`` that mark where a line enters (or leaves) the head."""
ROBUST_MAX_FRAC = 0.999
"""Quantile of the non-zero voxels that maps to 255 (``--fhi``); the FreeSurfer 7.4.1 fix."""
MIN_HEAD_FRACTION = 0.001
"""A head smaller than this fraction of the field of view is a noise blob, not a head."""
MIN_HEAD_VOLUME_ML = 100.0
"""A head mask smaller than this is noise, whatever the field of view (even slabs hold litres)."""
MIN_SEED_FRACTION = 0.1
"""A component at the volume centre smaller than this fraction of the largest one is a speck
(noise, a vessel, a bright voxel of another contrast), not the head."""
TISSUE_FRACTION = 0.5
"""The air threshold stays below this fraction of the median tissue intensity, so that a bright
compartment of another contrast (fluid, sinus or fat signal; more than the robust maximum's
0.1 %) cannot push the head under the threshold and leave only specks of it."""

_UCHAR_MAX = 255.0


def rescale_to_uchar(data: np.ndarray, *, robust_max_frac: float = ROBUST_MAX_FRAC) -> np.ndarray:
    """Rescale to float 0..255 with a robust maximum, so that thresholds mean the same in any scan.

    Values <= 0 and non-finite values map to 0; the ``robust_max_frac`` quantile of the positive
    voxels maps to 255 and brighter voxels are clipped. Using a quantile instead of the maximum
    keeps a few very bright voxels (vessels, fat, artefacts) from pushing the scalp below threshold.
    """
    if not 0.0 < robust_max_frac <= 1.0:
        raise ValueError(f"robust_max_frac must be in (0, 1], got {robust_max_frac}")
    values = np.array(data, dtype=np.float64)
    if not np.issubdtype(np.asarray(data).dtype, np.integer) and not np.isfinite(values).all():
        np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    # the voxels in memory order (nibabel's arrays are Fortran-ordered): a quantile does not
    # depend on the order, and gathering them across the memory took 0.3 s on a 1 mm head
    flat = values.ravel(order="K")
    positive = flat[flat > 0]
    if positive.size == 0:
        return np.zeros(values.shape)
    robust_max = np.quantile(positive, robust_max_frac, overwrite_input=True)
    values *= _UCHAR_MAX / robust_max
    return np.clip(values, 0.0, _UCHAR_MAX, out=values)


def air_threshold(intensity: np.ndarray, thresh1: float = THRESH1) -> float:
    """``thresh1`` on the 0..255 scale, lowered to ``TISSUE_FRACTION`` of the median tissue.

    ``mri_seghead``'s fixed threshold assumes that the robust maximum is bright tissue, true of a
    T1w (every development head keeps ``thresh1``). When a compartment brighter than the tissue
    by an order of magnitude fills more than 0.1 % of the volume, the tissue falls under the
    fixed threshold. The tissue is taken as the unsaturated voxels (below ``255 - THRESH2``, so
    not the compartment) above their mean: air fills much of any head scan, so the mean lies
    between air and tissue.
    """
    flat = intensity.ravel(order="K")  # memory order, as in ``rescale_to_uchar``
    unsaturated = flat[flat < _UCHAR_MAX - THRESH2]
    tissue = unsaturated[unsaturated > unsaturated.mean()] if unsaturated.size else unsaturated
    if tissue.size == 0:
        return thresh1
    return min(thresh1, TISSUE_FRACTION * float(np.median(tissue)))


def scanline_fill(bright: np.ndarray, axis: int, nhits_min: int) -> np.ndarray:
    """Fill every line along ``axis`` from its first to its last run of ``nhits_min`` bright voxels.

    Lines without such a run stay empty. Runs are found with a moving-window sum (cumulative sums),
    the outermost runs with ``argmax`` from both ends; the fill is an index comparison.
    """
    lines = np.moveaxis(bright, axis, -1)
    length = lines.shape[-1]
    cumsum = np.zeros(lines.shape[:-1] + (length + 1,), dtype=np.int32)
    np.cumsum(lines, axis=-1, out=cumsum[..., 1:])
    run_starts = (cumsum[..., nhits_min:] - cumsum[..., :-nhits_min]) == nhits_min
    # run_starts[..., i]: voxels i .. i + nhits_min - 1 of the line are all bright
    if run_starts.shape[-1] == 0:
        return np.zeros(bright.shape, dtype=bool)
    has_run = run_starts.any(axis=-1, keepdims=True)
    first = np.argmax(run_starts, axis=-1, keepdims=True)
    last = length - 1 - np.argmax(run_starts[..., ::-1], axis=-1, keepdims=True)
    index = np.arange(length)
    return np.moveaxis(has_run & (index >= first) & (index <= last), -1, axis)


def _central_voxels(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Indices of the volume centre: 1 voxel per odd axis, the 2 middle voxels per even axis.

    Using both middle voxels keeps the seed where it is when the array is flipped.
    """
    middles = [np.unique([(n - 1) // 2, n // 2]) for n in shape]
    return tuple(grid.ravel() for grid in np.meshgrid(*middles, indexing="ij"))


def _select_head_component(candidates: np.ndarray) -> np.ndarray:
    """The 6-connected component of ``candidates`` at the volume centre (``mri_seghead``'s seed).

    FreeSurfer stops when the centre voxel is not in the region; we instead fall back to the
    largest component, because a head placed off-centre in the field of view is still a head.
    Among several components at the centre (even-sized axes), the largest one wins, unless it is
    a speck beside a far larger component (``MIN_SEED_FRACTION``).
    """
    labels, n_labels = ndimage.label(candidates)
    if n_labels == 0:
        raise NoHeadError("no head found in the image: nothing above threshold")
    sizes = np.bincount(labels.ravel(), minlength=n_labels + 1)
    sizes[0] = 0
    at_centre = np.unique(labels[_central_voxels(labels.shape)])
    at_centre = at_centre[at_centre > 0]
    largest = int(np.argmax(sizes))
    if at_centre.size:
        seed = at_centre[np.argmax(sizes[at_centre])]
        if sizes[seed] >= MIN_SEED_FRACTION * sizes[largest]:
            return labels == seed
    return labels == largest


def _fill_holes_in(mask: np.ndarray, plane_normal: int | None) -> np.ndarray:
    """Fill holes of ``mask`` in 3-D (``plane_normal=None``) or in every slice normal to an axis.

    A hole is a background component that does not reach the border of the volume (or of the
    slice). Labelling the background once is much faster than ``binary_fill_holes``' iterated
    dilation; for slices, a structure without neighbours off the plane labels all slices at once.
    """
    structure = ndimage.generate_binary_structure(3, 1)
    border_axes = [0, 1, 2]
    if plane_normal is not None:
        off_plane = [slice(None)] * 3
        for side in (0, 2):
            off_plane[plane_normal] = side
            structure[tuple(off_plane)] = False
        border_axes.remove(plane_normal)
    labels, n_labels = ndimage.label(~mask, structure=structure)
    reaches_border = np.zeros(n_labels + 1, dtype=bool)
    for axis in border_axes:
        reaches_border[np.take(labels, [0, -1], axis=axis)] = True
    reaches_border[0] = False  # label 0 is the mask itself
    return ~reaches_border[labels]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill 3-D holes, then 2-D holes in every slice along each axis (e.g. mouth signal loss).

    The fills are repeated until nothing changes: each fill can close a hole for another, and the
    fixed point does not depend on the axis order, so the mask does not depend on orientation.
    ``mri_seghead`` also removes islands first; the flood-filled region is one component already.
    """
    filled = np.zeros_like(mask)
    if not mask.any():
        return filled
    # holes lie inside the mask's bounding box: fill there (with one voxel of background around)
    box = mask_box(mask, 1)
    inner = mask[box]
    fills = (None, 0, 1, 2)
    unchanged = 0  # fills in a row that changed nothing: all four make the fixed point
    for plane_normal in itertools.cycle(fills):
        before = inner
        inner = _fill_holes_in(inner, plane_normal)
        unchanged = unchanged + 1 if np.array_equal(inner, before) else 0
        if unchanged == len(fills):
            filled[box] = inner
            return filled


def seghead(
    data: np.ndarray,
    *,
    thresh1: float = THRESH1,
    thresh2: float = THRESH2,
    nhits_min: int = NHITS_MIN,
    robust_max_frac: float = ROBUST_MAX_FRAC,
) -> np.ndarray:
    """Boolean head mask of a 3-D intensity array (``mri_seghead --rescale --fill-holes-islands``).

    A voxel is a head candidate when it lies between the first and last bright runs (above
    ``air_threshold``) of its lines along all three axes, or is bright itself
    (``255 - intensity <= thresh2``). The head is the candidate component at the volume centre
    (largest component if the centre misses), with holes filled. Raises ``NoHeadError`` for
    empty, constant, or implausibly small results.
    """
    if data.ndim != 3:
        raise ValueError(f"seghead needs a 3-D array, got shape {data.shape}")
    if nhits_min < 1:
        raise ValueError(f"nhits_min must be >= 1, got {nhits_min}")
    intensity = rescale_to_uchar(data, robust_max_frac=robust_max_frac)
    bright = intensity > air_threshold(intensity, thresh1)
    inside_all_axes = np.logical_and.reduce(
        [scanline_fill(bright, axis, nhits_min) for axis in range(3)]
    )
    mrg = np.where(inside_all_axes, 0.0, _UCHAR_MAX - intensity)
    mask = _fill_holes(_select_head_component(mrg <= thresh2))
    n_head = int(np.count_nonzero(mask))
    if n_head < MIN_HEAD_FRACTION * mask.size:
        raise NoHeadError(
            f"no head found in the image: largest region has {n_head} voxels, "
            f"less than {MIN_HEAD_FRACTION:.1%} of the volume"
        )
    if n_head == mask.size:
        raise NoHeadError("no head found in the image: no background (constant image?)")
    return mask


def head_volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
    """Volume (mL) of a mask's non-zero voxels on a grid of any orientation and shear."""
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    return float(np.count_nonzero(mask) * voxel_ml)


def head_mask(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """Head mask (uint8 0/1) of ``img`` on its grid and affine; 4-D images use frame 0.

    Adds a world-unit size check to ``seghead``'s voxel-count check, since a few voxels of noise
    in a coarse or small field of view can pass a relative check. A ``NoHeadError`` names the
    image's file when it has one: with ``--apply-to`` the failing image may not be the T1w.
    """
    if len(img.shape) < 3:
        raise ValueError(f"head_mask needs a 3-D or 4-D image, got shape {img.shape}")
    first_frame = (slice(None),) * 3 + (0,) * (len(img.shape) - 3)
    data = np.asanyarray(img.dataobj[first_frame])
    try:
        mask = seghead(data)
        head_ml = head_volume_ml(mask, img.affine)
        if head_ml < MIN_HEAD_VOLUME_ML:
            raise NoHeadError(
                f"no head found in the image: head of {head_ml:.0f} mL is smaller than "
                f"{MIN_HEAD_VOLUME_ML:.0f} mL"
            )
    except NoHeadError as err:
        if img.get_filename() is None:
            raise
        raise NoHeadError(err.problem, path=img.get_filename()) from err
    return nib.Nifti1Image(mask.astype(np.uint8), img.affine)
