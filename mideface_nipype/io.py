"""Reading and writing volumes: validation with clear errors, raw dtypes kept, atomic writes.

Defaced outputs must leave every untouched voxel bit for bit as it was, so the engine works on the
*stored* (unscaled) values and writes them back with the input's header, scaling and dtype.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from mideface_nipype import __version__

#: Volume file name endings that nibabel reads and writes.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")
#: The smallest size of a spatial axis for an image to count as a volume (not a 2-D slice).
MIN_AXIS_VOXELS = 4
#: Voxel edges (mm) outside this range mean a broken header, not a head MRI.
VOXEL_MM_RANGE = (0.01, 20.0)
#: A field of view farther than this (mm) from the scanner origin means a broken header.
MAX_OFFSET_MM = 10_000.0


class InputError(ValueError):
    """An input file that cannot be defaced; the message names the file and the problem."""


def split_suffix(path: str | Path) -> tuple[str, str]:
    """(stem, suffix) for a volume path, treating ``.nii.gz`` as one suffix."""
    name = str(path)
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def load_volume(path: str | Path) -> nib.spatialimages.SpatialImage:
    """Load and validate a 3-D or 4-D volume; raise ``InputError`` naming the file and problem."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a volume file")
    _check_gzip(path)
    try:
        img = nib.load(path)
    except (
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
        OSError,
        EOFError,
        ValueError,
        zlib.error,
    ) as err:
        reason = " ".join(str(err).split())
        raise InputError(f"{path}: cannot be read as a NIfTI or MGZ volume ({reason})") from err
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise InputError(f"{path}: is not a volume image")
    shape = img.shape
    spatial = [n for n in shape[:3]]
    if len(shape) < 3 or min(spatial) < MIN_AXIS_VOXELS:
        raise InputError(
            f"{path}: is {len([n for n in shape if n > 1])}-D with shape {shape}; "
            "a 3-D volume (or a 4-D series) is needed"
        )
    if len(shape) > 4 and any(n > 1 for n in shape[4:]):
        raise InputError(f"{path}: has {len(shape)} dimensions {shape}; 3-D or 4-D is needed")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputError(f"{path}: has an unusable voxel-to-world affine")
    voxel_mm = np.linalg.norm(affine[:3, :3], axis=0)
    if voxel_mm.min() < VOXEL_MM_RANGE[0] or voxel_mm.max() > VOXEL_MM_RANGE[1]:
        raise InputError(
            f"{path}: has an absurd affine: voxels of {np.round(voxel_mm, 4).tolist()} mm "
            f"(a head MRI has {VOXEL_MM_RANGE[0]} to {VOXEL_MM_RANGE[1]} mm)"
        )
    centre_mm = affine[:3, :3] @ ((np.asarray(shape[:3]) - 1) / 2.0) + affine[:3, 3]
    if np.abs(centre_mm).max() > MAX_OFFSET_MM:
        raise InputError(
            f"{path}: has an absurd affine: the field of view is centred "
            f"{np.abs(centre_mm).max():.3g} mm from the scanner origin"
        )
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as err:
        reason = " ".join(str(err).split())
        raise InputError(f"{path}: the voxel data are truncated or corrupt ({reason})") from err
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputError(f"{path}: voxel type {data.dtype} is not a real number type")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InputError(f"{path}: contains {bad} NaN or infinite voxels")
    if data.size == 0 or np.ptp(data) == 0:
        raise InputError(f"{path}: is empty (every voxel has the same value)")
    return img


def _check_gzip(path: Path) -> None:
    """Read a gzip stream to its end: only there its CRC shows corruption (nibabel stops early)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror})") from err
    if magic != b"\x1f\x8b":
        return
    try:
        with gzip.open(path) as stream:
            while stream.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as err:
        reason = " ".join(str(err).split())
        message = f"{path}: the compressed data are truncated or corrupt ({reason})"
        raise InputError(message) from err


def stored_data(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    """The voxel values as stored on disk (no scl_slope/inter), 3-D or 4-D."""
    proxy = img.dataobj
    data = np.asanyarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
    return data.reshape(data.shape[:4]) if data.ndim > 4 else data


def to_stored(img: nib.spatialimages.SpatialImage, values: tuple[float, ...]) -> tuple[float, ...]:
    """Real-unit values in the image's stored units (undo scl_slope/inter)."""
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    return tuple((float(v) - inter) / slope for v in values)


def first_frame(img: nib.spatialimages.SpatialImage, frame: int = 0) -> np.ndarray:
    """One 3-D frame in real units (scaling applied), as float32."""
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    while data.ndim > 3:
        data = data[..., frame] if data.ndim == 4 else data[..., 0]
    return data


def like(
    img: nib.spatialimages.SpatialImage, data: np.ndarray, *, descrip: str | None = None
) -> nib.spatialimages.SpatialImage:
    """A new image of ``img``'s class, header, affine and scaling holding stored values ``data``."""
    new = img.__class__(data, img.affine, img.header.copy())
    if isinstance(new, nib.Nifti1Image | nib.Nifti2Image | nib.Nifti1Pair):
        slope, inter = img.dataobj.slope, img.dataobj.inter
        new.header.set_slope_inter(slope, inter)
        if descrip is not None:
            new.header["descrip"] = descrip[:79].encode()
    return new


def defaced_descrip() -> str:
    """The NIfTI ``descrip`` of a defaced volume (80 characters at most)."""
    return f"defaced by mideface-nipype {__version__}"


def mask_image(data: np.ndarray, reference: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """A uint8 label/mask image on the grid of ``reference``."""
    img = nib.Nifti1Image(np.asarray(data, dtype=np.uint8), reference.affine)
    img.header.set_xyzt_units("mm")
    return img


def save_atomic(img: nib.spatialimages.SpatialImage, path: str | Path) -> Path:
    """Save so that ``path`` either holds the complete file or is untouched (temp file + rename)."""
    path = Path(path)
    _, suffix = split_suffix(path)
    if not suffix:
        raise InputError(f"{path}: unknown volume format; use one of {', '.join(VOLUME_SUFFIXES)}")
    if suffix in (".mgz", ".mgh") and not isinstance(img, nib.MGHImage):
        img = _to_mgh(img)
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)
    return path


def _to_mgh(img: nib.spatialimages.SpatialImage) -> nib.MGHImage:
    """MGH keeps no scaling and only uint8/int16/int32/float32: apply the scaling where needed."""
    data = np.asanyarray(img.dataobj)
    slope, inter = (
        img.header.get_slope_inter() if hasattr(img.header, "get_slope_inter") else (1, 0)
    )
    if (slope not in (None, 1.0)) or (inter not in (None, 0.0)):
        data = data * np.float32(slope or 1.0) + np.float32(inter or 0.0)
    if data.dtype not in (np.uint8, np.int16, np.int32, np.float32):
        ok_int = np.issubdtype(data.dtype, np.integer) and np.can_cast(data.dtype, np.int32)
        data = data.astype(np.int32 if ok_int else np.float32)
    return nib.MGHImage(data, img.affine)


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[str]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` only on success.

    ``path`` thus either holds a complete file or is untouched, also when the process is killed
    (a killed write leaves only a hidden ``.<name>.*`` file, which ``remove_stale_temps`` clears).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(path: str | Path) -> None:
    """Temporary files of an earlier write of ``path`` that was killed before its rename."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*"):
        stale.unlink(missing_ok=True)


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a text file atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` so that ``dst`` is either complete or untouched."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)
