"""Face filling and provenance tag: the last step of the MiDeFace engine.

Given a face mask with compartments 0 (untouched), 1 (inside template, in head), 2 (inside
template, not in head), 3 (outside template, in head) and 4 (outside template, not in head), the
face is replaced by noise: tissue-like noise (around the mean of compartment 1) inside the template
surface and background-like noise (around the mode of compartment 4) outside it.  Everything works
on the raw stored array so that untouched voxels keep their exact bytes, and the file can be written
back with the input's own header scaling.  Afterwards a short ASCII tag is written into a corner
line of the volume so that a defaced file can be recognised (``check_code``), even after it has
been reoriented.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_SEED = 53
NPERBIN = 20
NBINS_MAX = 200
STAT_FRAME = 0
CODE = "mideface-nipype"
CODE_VERSION = "v001"
KNOWN_CODES = (CODE, "mideface-freesurfer")
#: The tag written by :func:`embed_code`.
CODE_TAG = f"{CODE}-{CODE_VERSION}"

_LABELS = (0, 1, 2, 3, 4)
#: Labels of a face mask for sharing: its air compartments merged into the tissue ones on the
#: same side of the template face (inward 2 -> 1, outward 4 -> 3).
SHAREABLE_MERGE = {2: 1, 4: 3}


@dataclass(frozen=True)
class FillStats:
    """Intensity statistics of the face compartments that define the fill distributions.

    ``*1`` describe compartment 1 (tissue under the average face), ``*4`` compartment 4
    (background outside it).  ``mode4`` is the histogram mode of compartment 4 from ``nbins4``
    bins; ``mean_ratio`` is ``mean1 / mean4`` (``None`` when ``mean4`` is 0).
    """

    n1: int
    mean1: float
    std1: float
    min1: float
    max1: float
    n2: int
    n3: int
    n4: int
    mean4: float
    std4: float
    mode4: float
    min4: float
    max4: float
    nbins4: int
    mean_ratio: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of Python scalars, ready for ``json.dump``."""
        return asdict(self)


def _check_dtype(dtype: np.dtype) -> None:
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise TypeError(f"unsupported voxel data type {dtype}: need an integer or float type")


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> None:
    if mask.shape != shape:
        raise ValueError(f"face mask shape {mask.shape} does not match volume shape {shape}")
    if not np.isin(mask, _LABELS).all():
        raise ValueError("face mask values must be the compartment labels 0, 1, 2, 3 or 4")


def _finite(values: np.ndarray) -> np.ndarray:
    """Values as float64 without NaN/inf, which would poison the mean, SD and histogram."""
    values = values.astype(np.float64)
    return values[np.isfinite(values)]


def _histogram_mode(values: np.ndarray, *, integer: bool, n1: int) -> tuple[float, int]:
    """Mode of ``values`` and the number of bins used, as the MiDeFace engine bins them.

    Integer data: bins of width 1 from ``floor(min)`` to ``ceil(max)`` (counted with ``np.unique``
    so a wide int32 range needs no huge histogram).  Float data: ``min(ceil(n1 / NPERBIN),
    NBINS_MAX)`` bins (at least 2) whose centres run from min to max, bin index
    ``nint((v - min) / binsize)``.  Ties go to the lowest bin.
    """
    vmin, vmax = float(values.min()), float(values.max())
    if integer:
        uniq, counts = np.unique(values, return_counts=True)
        return float(uniq[np.argmax(counts)]), int(vmax - vmin) + 1
    if vmin == vmax:
        return vmin, 1
    nbins = max(2, min(math.ceil(n1 / NPERBIN), NBINS_MAX))
    binsize = (vmax - vmin) / (nbins - 1)
    index = np.floor((values - vmin) / binsize + 0.5).astype(np.intp)
    counts = np.bincount(index, minlength=nbins)
    return vmin + float(np.argmax(counts)) * binsize, nbins


def shareable_face_mask(face_mask: np.ndarray) -> np.ndarray:
    """The face mask without its tissue/air split (``SHAREABLE_MERGE``): that split follows
    the original skin inside the replaced region, so the full mask gives the face back."""
    out = np.array(face_mask, copy=True)
    for air, tissue in SHAREABLE_MERGE.items():
        out[out == air] = tissue
    return out


def is_shareable(face_mask: np.ndarray) -> bool:
    """Whether a face mask has no air compartment (``shareable_face_mask``'s form)."""
    return not np.isin(face_mask, list(SHAREABLE_MERGE)).any()


def split_tissue_air(face_mask: np.ndarray, head: np.ndarray) -> np.ndarray:
    """A shareable face mask's compartments split again at ``head`` (the defaced image's own
    head mask): outside it, each merged label goes back to its air label."""
    out = np.array(face_mask, copy=True)
    outside = ~np.asarray(head, dtype=bool)
    for air, tissue in SHAREABLE_MERGE.items():
        out[(out == tissue) & outside] = air
    return out


def compartment_stats(frame: np.ndarray, face_mask: np.ndarray) -> FillStats:
    """Statistics of one 3-D frame under the face mask (compartments 1 and 4 define the fill).

    Mean and population SD of compartments 1 and 4, true min/max (FreeSurfer starts min/max at 0;
    the true range gives the same integer mode and a better float histogram) and the histogram
    mode of compartment 4.  Non-finite voxels are ignored.  Raises ``ValueError`` when
    compartment 1 or 4 has no finite voxel, since there is then nothing to imitate.
    """
    frame = np.asarray(frame)
    mask = np.asarray(face_mask)
    _check_dtype(frame.dtype)
    if frame.ndim != 3:
        raise ValueError(f"expected a 3-D frame, got shape {frame.shape}")
    _check_mask(mask, frame.shape)
    vals1 = _finite(frame[mask == 1])
    vals4 = _finite(frame[mask == 4])
    for label, vals in ((1, vals1), (4, vals4)):
        if vals.size == 0:
            raise ValueError(
                f"face mask compartment {label} has no (finite) voxels: cannot compute the "
                "fill statistics"
            )
    mode4, nbins4 = _histogram_mode(
        vals4, integer=np.issubdtype(frame.dtype, np.integer), n1=vals1.size
    )
    mean1, mean4 = float(vals1.mean()), float(vals4.mean())
    return FillStats(
        n1=int(vals1.size),
        mean1=mean1,
        std1=float(vals1.std()),
        min1=float(vals1.min()),
        max1=float(vals1.max()),
        n2=int(np.count_nonzero(mask == 2)),
        n3=int(np.count_nonzero(mask == 3)),
        n4=int(vals4.size),
        mean4=mean4,
        std4=float(vals4.std()),
        mode4=mode4,
        min4=float(vals4.min()),
        max4=float(vals4.max()),
        nbins4=nbins4,
        mean_ratio=mean1 / mean4 if mean4 != 0 else None,
    )


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip into an integer type's range (a plain cast would wrap around); cast floats."""
    if np.issubdtype(dtype, np.floating):
        return values.astype(dtype)
    info = np.iinfo(dtype)
    high = float(info.max)
    if int(high) > info.max:  # 64-bit maxima round up in float64; stay below them
        high = float(np.nextafter(high, 0.0))
    return np.clip(np.rint(values), float(info.min), high).astype(dtype)


def fill_face(
    data: np.ndarray,
    face_mask: np.ndarray,
    *,
    seed: int = DEFAULT_SEED,
    fill_const: tuple[float, float] | None = None,
    stat_frame: int = STAT_FRAME,
) -> tuple[np.ndarray, FillStats]:
    """Replace the face compartments of a raw 3-D or 4-D (frames last) array with noise.

    Statistics come from frame ``stat_frame`` only and define the same distribution for every
    frame.  Compartments 1-2 get ``|(U - 0.5) * std1 + mean1|``, compartments 3-4 get
    ``|(U - 0.5) * std4 + mode4|`` with ``U ~ U(0, 1)`` from ``np.random.default_rng(seed)``:
    one draw per masked voxel per frame, frames in order and, within a frame, masked voxels in
    C (row-major) order, so the same seed and input give identical bytes.  With
    ``fill_const=(c_in, c_out)`` compartments 1-2 get ``|c_in|`` and 3-4 ``|c_out|`` instead
    (statistics are still computed and returned).  The result keeps the input's dtype (integers
    rounded and clipped to the type's range) and shape; compartment-0 voxels are bit-identical.
    """
    data = np.asarray(data)
    _check_dtype(data.dtype)
    if data.ndim not in (3, 4):
        raise ValueError(f"expected a 3-D or 4-D volume, got shape {data.shape}")
    nframes = data.shape[3] if data.ndim == 4 else 1
    if not 0 <= stat_frame < nframes:
        raise ValueError(f"stat_frame {stat_frame} is out of range for {nframes} frame(s)")
    mask = np.asarray(face_mask)
    stats = compartment_stats(data[..., stat_frame] if data.ndim == 4 else data, mask)

    where = mask > 0
    inner = mask[where] <= 2
    out = data.copy()
    frames = [out[..., f] for f in range(nframes)] if data.ndim == 4 else [out]
    if fill_const is not None:
        c_in, c_out = (float(c) for c in fill_const)
        if not (math.isfinite(c_in) and math.isfinite(c_out)):
            raise ValueError(f"fill constants must be finite, got {fill_const}")
        values = _to_dtype(np.abs(np.where(inner, c_in, c_out)), data.dtype)
        for view in frames:
            view[where] = values
        return out, stats

    centre = np.where(inner, stats.mean1, stats.mode4)
    spread = np.where(inner, stats.std1, stats.std4)
    rng = np.random.default_rng(seed)
    for view in frames:  # views into ``out``: assignment writes through
        noise = (rng.random(centre.size) - 0.5) * spread + centre
        view[where] = _to_dtype(np.abs(noise), data.dtype)
    return out, stats


def code_fits(shape: tuple[int, ...]) -> bool:
    """Whether :data:`CODE_TAG` fits in the volume (any 3-D grid of at least 20 voxels)."""
    return len(shape) >= 3 and math.prod(shape[:3]) >= len(CODE_TAG)


def _code_axes(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Axis order of the tag: along the first axis if it is long enough (the original layout,
    so results made before the fallback keep their bytes), else along the first axis that is,
    else along the longest axis, continued on the next lines (longest axes first)."""
    n = len(CODE_TAG)
    long_enough = [a for a in range(3) if shape[a] >= n]
    first = long_enough[0] if long_enough else int(np.argmax(shape[:3]))
    rest = sorted((a for a in range(3) if a != first), key=lambda a: -shape[a])
    return first, rest[0], rest[1]


def _code_voxels(shape: tuple[int, ...]) -> np.ndarray:
    """(20, 3) voxel indices of the tag: the first voxels of the grid read with the
    :func:`_code_axes` order, first axis fastest, all from the corner (0, 0, 0)."""
    axes = _code_axes(shape)
    sizes = [shape[a] for a in axes]
    k = np.arange(len(CODE_TAG))
    ordered = np.stack([k % sizes[0], (k // sizes[0]) % sizes[1], k // (sizes[0] * sizes[1])])
    voxels = np.zeros((3, k.size), np.intp)
    voxels[list(axes)] = ordered
    return voxels.T


def code_location(shape: tuple[int, ...]) -> dict[str, Any]:
    """Where :func:`embed_code` puts the tag in a volume of ``shape`` (for ``stats.json``)."""
    if not code_fits(shape):
        raise ValueError(f"the provenance code needs at least {len(CODE_TAG)} voxels: {shape}")
    axes = _code_axes(shape)
    voxels = _code_voxels(shape)
    n_lines = -(-len(CODE_TAG) // shape[axes[0]])
    where = f"along axis {axes[0]} from voxel (0, 0, 0)"
    if n_lines > 1:
        where += f", on {n_lines} lines of {shape[axes[0]]} voxels (next along axis {axes[1]}"
        where += f", then {axes[2]})"
    return {
        "tag": CODE_TAG,
        "axis_order": list(axes),
        "n_lines": n_lines,
        "first_voxel": voxels[0].tolist(),
        "last_voxel": voxels[-1].tolist(),
        "description": f"{len(CODE_TAG)} voxels {where}, every frame",
    }


def _ascii(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8)


def embed_code(data: np.ndarray) -> np.ndarray:
    """Copy of ``data`` with the ASCII codes of :data:`CODE_TAG` in the :func:`code_location`
    voxels: ``(k, 0, 0)`` when the first axis has 20 voxels, else another axis or lines.

    Every frame is tagged.  ASCII codes are < 128 and therefore exact in every supported dtype.
    A volume of fewer than 20 voxels (never a valid input) is returned unchanged, as a copy.
    """
    out = np.array(data, copy=True)
    _check_dtype(out.dtype)
    if not code_fits(out.shape):
        return out
    codes = _ascii(CODE_TAG)
    i, j, k = _code_voxels(out.shape).T
    out[i, j, k] = codes.reshape((-1,) + (1,) * (out.ndim - 3))
    return out


def deface(
    data: np.ndarray,
    face_mask: np.ndarray,
    *,
    seed: int = DEFAULT_SEED,
    fill_const: tuple[float, float] | None = None,
    stat_frame: int = STAT_FRAME,
) -> tuple[np.ndarray, FillStats]:
    """The defaced volume: the face compartments filled (``fill_face``), then the provenance code
    embedded (``embed_code``), so that every defaced output carries it; and the fill statistics."""
    out, stats = fill_face(data, face_mask, seed=seed, fill_const=fill_const, stat_frame=stat_frame)
    return embed_code(out), stats


def _orientations(frame: np.ndarray) -> Iterator[np.ndarray]:
    """The 48 views of a 3-D frame under every permutation and flip of its axes."""
    for perm in itertools.permutations(range(3)):
        moved = np.transpose(frame, perm)
        for flips in itertools.product((False, True), repeat=3):
            yield np.flip(moved, [a for a in range(3) if flips[a]])


def _leading_voxels(view: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` voxels of ``view`` read first axis fastest (only the corner is copied)."""
    n0, n1, _ = view.shape
    rows = min(n1, -(-n // n0))
    slabs = 1 if n0 * n1 >= n else -(-n // (n0 * n1))
    return view[:, :rows, :slabs].ravel(order="F")[:n]


def check_code(data: np.ndarray, codes: Sequence[str] = KNOWN_CODES) -> bool:
    """Whether frame 0 carries one of ``codes`` (by default any of :data:`KNOWN_CODES`: the
    volume was defaced).

    The tag starts in a corner and runs along one axis (continued on the next lines when no
    axis is long enough); any flip or permutation of the axes moves it onto another corner and
    axis order, so all 48 orientations are read, from their corner, first axis fastest.
    """
    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise ValueError(f"expected a 3-D or 4-D volume, got shape {data.shape}")
    frame = data[..., 0] if data.ndim == 4 else data
    tags = [_ascii(code) for code in codes]
    longest = max(t.size for t in tags)
    for view in _orientations(frame):
        leading = _leading_voxels(view, min(longest, frame.size))
        if any(np.array_equal(leading[: t.size], t) for t in tags):
            return True
    return False
