"""Reading and writing volumes: validation with clear errors, raw dtypes kept, safe publishing.

Defaced outputs must leave every untouched voxel bit for bit as it was, so the engine works on the
*stored* (unscaled) values and writes them back with the input's header, scaling and dtype.
Every file a command writes goes through a ``Publisher``: it never writes onto a file the run
reads, writes to a temp name + fsync + rename, gives the umask's mode and, when the run fails,
removes whatever the run wrote.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import logging
import os
import re
import shutil
import stat
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np

from mideface_nipype import __version__
from mideface_nipype.utils.errors import InputError, OutputError, carried_error
from mideface_nipype.utils.geometry import voxel_sizes

#: The suffixes of FreeSurfer's MGH format.
MGH_SUFFIXES = (".mgz", ".mgh")
#: Volume file name endings that nibabel reads and writes.
VOLUME_SUFFIXES = (".nii.gz", ".nii", *MGH_SUFFIXES)
#: Volume formats nibabel reads but we do not write (a pair by its header): an audit examines
#: them too, and what is made from one is written as ``FALLBACK_SUFFIX``.
READ_ONLY_SUFFIXES = (".nii.bz2", ".hdr", ".mnc")
#: The format of what is made from an input in a format nibabel only reads.
FALLBACK_SUFFIX = ".nii.gz"
#: The two files of a paired format (Analyze/NIfTI pair, Philips PAR/REC): reading one reads
#: the other.
PAIRED_SUFFIXES = {".hdr": ".img", ".img": ".hdr", ".par": ".rec", ".rec": ".par"}
#: The smallest size of a spatial axis for an image to count as a volume (not a 2-D slice).
MIN_AXIS_VOXELS = 4
#: Voxel edges (mm) outside this range mean a broken header, not a head MRI.
VOXEL_MM_RANGE = (0.01, 20.0)
#: A field of view farther than this (mm) from the scanner origin means a broken header.
MAX_OFFSET_MM = 10_000.0
#: Default memory budget (GB) of a run: a bigger volume is refused from its header (--max-gb).
DEFAULT_MAX_GB = 8.0
#: Whole-volume float32 arrays a run holds at its peak (working copies, masks, distance maps,
#: noise, resampled grids): the header's voxel count times 4 bytes times this estimates its
#: memory. Measured peak RSS: 0.72 GB for 120x120x90 voxels, 1.16 GB for 181x217x181, i.e.
#: 75 bytes (19 float32) per voxel above a fixed 0.6 GB.
WORK_COPIES = 20


#: errno values of a write the file system refused (full, over quota, read-only, file too big):
#: the output that could not be written is named, as for any other output error.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})

#: An OSError as a traceback's text gives it (a Nipype node's crash): its errno and reason.
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:'\n]+)")

#: Name start of the hidden folder where ``Publisher.staged`` files wait.
STAGING_PREFIX = ".mideface-staging."


def split_suffix(path: str | Path) -> tuple[str, str]:
    """(stem, suffix) for a volume path, treating ``.nii.gz`` as one suffix."""
    name = str(path)
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def is_volume_name(path: str | Path) -> bool:
    """Whether ``path`` is named as a volume nibabel reads (``VOLUME_SUFFIXES`` or
    ``READ_ONLY_SUFFIXES``)."""
    return str(path).lower().endswith((*VOLUME_SUFFIXES, *READ_ONLY_SUFFIXES))


def image_files(path: str | Path) -> list[Path]:
    """``path`` and, for one file of a pair (``head.hdr``), its partner in either case
    (``head.img``, ``head.IMG``): a run that reads one reads both, so neither may be written."""
    path = Path(path)
    root, ext, compressed = nib.filename_parser.splitext_addext(str(path))
    partner = PAIRED_SUFFIXES.get(ext.lower())
    if partner is None:
        return [path]
    return [path, *(Path(root + p + compressed) for p in (partner, partner.upper()))]


def derived_name_parts(path: str | Path) -> tuple[str, str]:
    """(stem, suffix) for a file made from the volume ``path``: its own suffix, or for a
    format nibabel only reads (``head.hdr``) its name without nibabel's extension and
    ``FALLBACK_SUFFIX``, so such an input is defaced like any other instead of failing at the
    end for want of an output format."""
    stem, suffix = split_suffix(path)
    if suffix:
        return stem, suffix
    root, _, _ = nib.filename_parser.splitext_addext(str(path))
    return root, FALLBACK_SUFFIX


def load_volume(path: str | Path, *, max_gb: float | None = None) -> nib.spatialimages.SpatialImage:
    """Load and validate a 3-D or 4-D volume; raise ``InputError`` naming the file and problem.

    The header is checked first (shape, affine and, with ``max_gb``, the memory the run would
    need), so an absurd header is refused before its voxel data are read.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path=path)
    if path.is_dir():
        raise InputError("is a folder, not a volume file", path=path)
    try:
        with _quiet_nibabel():
            img = nib.load(path)
    except (
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
        OSError,
        EOFError,
        ValueError,
        zlib.error,
    ) as err:
        _check_gzip(path)
        reason = " ".join(str(err).split())
        raise InputError(f"cannot be read as a NIfTI or MGZ volume ({reason})", path=path) from err
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise InputError("is not a volume image", path=path)
    shape = img.shape
    spatial = [n for n in shape[:3]]
    if len(shape) < 3 or min(spatial) < MIN_AXIS_VOXELS:
        raise InputError(
            f"is {len([n for n in shape if n > 1])}-D with shape {shape}; "
            "a 3-D volume (or a 4-D series) is needed",
            path=path,
        )
    if len(shape) > 4 and any(n > 1 for n in shape[4:]):
        raise InputError(f"has {len(shape)} dimensions {shape}; 3-D or 4-D is needed", path=path)
    _check_voxel_size(img, path)
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputError("has an unusable voxel-to-world affine", path=path)
    voxel_mm = voxel_sizes(affine)
    if voxel_mm.min() < VOXEL_MM_RANGE[0] or voxel_mm.max() > VOXEL_MM_RANGE[1]:
        raise InputError(
            f"has an absurd affine: voxels of {np.round(voxel_mm, 4).tolist()} mm "
            f"(a head MRI has {VOXEL_MM_RANGE[0]} to {VOXEL_MM_RANGE[1]} mm)",
            path=path,
        )
    centre_mm = affine[:3, :3] @ ((np.asarray(shape[:3]) - 1) / 2.0) + affine[:3, 3]
    if np.abs(centre_mm).max() > MAX_OFFSET_MM:
        raise InputError(
            f"has an absurd affine: the field of view is centred "
            f"{np.abs(centre_mm).max():.3g} mm from the scanner origin",
            path=path,
        )
    if max_gb is not None:
        check_size(img, path, max_gb)
    img = _in_memory(img, _check_gzip(path), path)
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as err:
        reason = " ".join(str(err).split())
        raise InputError(f"the voxel data are truncated or corrupt ({reason})", path=path) from err
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputError(f"voxel type {data.dtype} is not a real number type", path=path)
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InputError(f"contains {bad} NaN or infinite voxels", path=path)
    if data.size == 0 or np.ptp(data) == 0:
        raise InputError("is empty (every voxel has the same value)", path=path)
    _check_scaling(img, data, path)
    return img


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel logs the header fixes it makes (a 0 pixdim read as 1) as warnings of its own:
    the command's one error line says what matters (``_check_voxel_size``)."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_voxel_size(img: nib.spatialimages.SpatialImage, path: Path) -> None:
    """A NIfTI whose affine comes from ``pixdim`` (no sform) must give its voxel size there:
    nibabel reads a 0 as 1 mm, and a 2 mm head read at 1 mm is half its size (the atlas then
    fits it nowhere, which showed only after the registration, as a misleading refusal)."""
    if not isinstance(img.header, nib.Nifti1Header) or img.header["sform_code"] > 0:
        return
    # the header as stored: nibabel's loaded header has its zeros already replaced by 1
    holder = img.file_map.get("header") or img.file_map["image"]  # a pair, or one file
    with nib.openers.ImageOpener(holder.filename) as stream:
        stored = type(img.header).from_fileobj(stream, check=False)
    pixdim = np.asarray(stored["pixdim"][1:4], dtype=float)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0):
        raise InputError(
            f"the header gives no voxel size (pixdim {pixdim.tolist()} and no sform): "
            "the head's size in mm is unknown",
            path=path,
        )


def load_matrix(path: str | Path) -> np.ndarray:
    """A 4x4 affine from a text file (``--init-reg``, ``--apply`` REG); ``InputError`` if not."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    try:
        matrix = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())
        raise InputError(f"is not a text 4x4 matrix ({reason})", path=path) from err
    if matrix.size != 16:
        raise InputError(f"has {matrix.size} numbers; a 4x4 matrix (16) is needed", path=path)
    matrix = matrix.reshape(4, 4)
    if (
        not np.all(np.isfinite(matrix))
        or not np.allclose(matrix[3], (0, 0, 0, 1))
        or abs(np.linalg.det(matrix[:3, :3])) < 1e-6
    ):
        raise InputError("is not an invertible affine 4x4 matrix (last row 0 0 0 1)", path=path)
    return matrix


def needed_gb(shape: tuple[int, ...]) -> float:
    """The memory (GB) a run on a volume of ``shape`` needs: ``WORK_COPIES`` float32 volumes."""
    return float(np.prod(shape[:3], dtype=np.float64)) * 4 * WORK_COPIES / 1e9


def check_size(img: nib.spatialimages.SpatialImage, path: str | Path, max_gb: float) -> None:
    """Refuse, from the header alone, a volume whose run would need more than ``max_gb``."""
    frames = float(np.prod(img.shape[3:], dtype=np.float64)) if len(img.shape) > 3 else 1.0
    raw_gb = float(np.prod(img.shape[:3], dtype=np.float64)) * frames * 8 / 1e9  # in + out
    gb = needed_gb(img.shape) + raw_gb
    if gb > max_gb:
        raise InputError(
            f"its header claims {'x'.join(str(n) for n in img.shape)} voxels, which "
            f"needs about {gb:.3g} GB of memory (more than --max-gb {max_gb:g})",
            path=path,
        )


def _check_scaling(img: nib.spatialimages.SpatialImage, data: np.ndarray, path: Path) -> None:
    """Refuse a scl_slope/scl_inter that turns stored values into infinities in float32."""
    slope = float(getattr(img.dataobj, "slope", 1.0))
    inter = float(getattr(img.dataobj, "inter", 0.0))
    if slope == 1.0 and inter == 0.0:
        return
    extreme = float(max(abs(float(data.min())), abs(float(data.max()))))
    biggest = abs(slope) * extreme + abs(inter)
    finite = np.isfinite(slope) and np.isfinite(inter)
    if not finite or biggest > float(np.finfo(np.float32).max):
        raise InputError(
            f"the scaling (scl_slope {slope:g}, scl_inter {inter:g}) overflows float32: "
            f"stored values up to {extreme:g} become {biggest:.3g}; fix the header's scaling",
            path=path,
        )


#: Files whose gzip stream was read to its end in this process: (path, inode, size, mtime).
_GZIP_CHECKED: set[tuple[str, int, int, int]] = set()
#: The decompressed contents of the last ``_KEEP_DECOMPRESSED`` of them (each up to
#: ``_KEEP_DECOMPRESSED_BYTES``), by the same key: every step of a run reads the input again,
#: and decompressing a 1 mm head costs 0.2 s each time (a 176x256x256 head's run: 0.9 s of its
#: 20 s; 23 MB kept). Two: the reference and one other contrast of a run.
_DECOMPRESSED: dict[tuple[str, int, int, int], bytes] = {}
_KEEP_DECOMPRESSED = 2
_KEEP_DECOMPRESSED_BYTES = 1 << 28


def _check_gzip(path: Path) -> bytes | None:
    """Read a gzip stream to its end: only there its CRC shows corruption (nibabel stops early).

    Once per file and process (the steps of a run read the same input one after another); a
    file written again has another inode, size or time and is read again. Returns the
    decompressed contents while kept (``_DECOMPRESSED``), else None (also for a plain file).
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
            info = os.fstat(fh.fileno())
    except OSError as err:
        raise InputError(f"cannot be read ({err.strerror})", path=path) from err
    key = (str(Path(path).resolve()), info.st_ino, info.st_size, info.st_mtime_ns)
    if magic != b"\x1f\x8b" or key in _GZIP_CHECKED:
        return _DECOMPRESSED.get(key)
    chunks, kept_bytes = [], 0
    try:
        with gzip.open(path) as stream:
            while chunk := stream.read(1 << 24):
                kept_bytes += len(chunk)
                if kept_bytes <= _KEEP_DECOMPRESSED_BYTES:
                    chunks.append(chunk)
                else:
                    chunks.clear()
    except (OSError, EOFError, zlib.error) as err:
        reason = " ".join(str(err).split())
        message = f"the compressed data are truncated or corrupt ({reason})"
        raise InputError(message, path=path) from err
    _GZIP_CHECKED.add(key)
    if kept_bytes > _KEEP_DECOMPRESSED_BYTES:
        return None
    while len(_DECOMPRESSED) >= _KEEP_DECOMPRESSED:
        del _DECOMPRESSED[next(iter(_DECOMPRESSED))]
    _DECOMPRESSED[key] = b"".join(chunks)
    return _DECOMPRESSED[key]


def _in_memory(
    img: nib.spatialimages.SpatialImage, contents: bytes | None, path: Path
) -> nib.spatialimages.SpatialImage:
    """``img`` read from its decompressed ``contents`` (same header, data and file name), so
    that reading its voxels again decompresses nothing; ``img`` itself if that cannot be."""
    if contents is None or not isinstance(img, nib.filebasedimages.SerializableImage):
        return img
    try:
        copy = img.__class__.from_bytes(contents)
    except NotImplementedError:  # an image of several files (.hdr/.img)
        return img
    copy.set_filename(str(path))
    return copy


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
    img, suffix = _in_format(img, path, InputError)
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)
    return path


#: The voxel types an MGH file can hold, smallest first.
MGH_DTYPES = (np.uint8, np.int16, np.int32, np.float32)


def _in_format(
    img: nib.spatialimages.SpatialImage, path: str | Path, error: type[InputError]
) -> tuple[nib.spatialimages.SpatialImage, str]:
    """``img`` as ``path``'s suffix stores it (MGH for ``.mgz``/``.mgh``), and that suffix;
    ``error`` naming ``path`` when the suffix is not a volume format."""
    _, suffix = split_suffix(path)
    if not suffix:
        raise error(f"unknown volume format; use one of {', '.join(VOLUME_SUFFIXES)}", path=path)
    if suffix in MGH_SUFFIXES and not isinstance(img, nib.MGHImage):
        img = _to_mgh(img)
    return img, suffix


def _to_mgh(img: nib.spatialimages.SpatialImage) -> nib.MGHImage:
    """The volume as MGH, which keeps no scaling and only the ``MGH_DTYPES``.

    Unscaled data keep their dtype where MGH can store it (else int32 or float32). Scaled data
    become their real values: the smallest MGH integer type when the scaling gives integers in
    its range, else float32. A provenance code in the stored values is embedded again in the
    converted values, so ``--check`` still finds it.
    """
    from mideface_nipype.engine import fill

    stored = stored_data(img)
    data = _mgh_values(img, stored)
    if data.dtype not in MGH_DTYPES:
        data = data.astype(_smallest_mgh_dtype(data))
    if data is not stored and fill.check_code(stored) and not fill.check_code(data):
        data = fill.embed_code(data)
    return nib.MGHImage(data, img.affine)


def _mgh_values(img: nib.spatialimages.SpatialImage, stored: np.ndarray) -> np.ndarray:
    """``stored`` (``img``'s stored data) in the units MGH gets: unscaled as they are, scaled
    as int64 when the scaling and the data are integers, else as float32 real values."""
    slope, inter = _scaling(img)
    if (slope, inter) == (1.0, 0.0):
        return stored
    if float(slope).is_integer() and float(inter).is_integer() and stored.dtype.kind in "iu":
        return stored.astype(np.int64) * int(slope) + int(inter)
    return stored * np.float32(slope) + np.float32(inter)


def mgh_rounding(img: nib.spatialimages.SpatialImage) -> tuple[int, np.dtype, np.dtype]:
    """(voxels that change, from, to): the cast ``_to_mgh`` makes of ``img``'s values to a type
    MGH stores (float64 to float32, integers beyond int32 to float32); (0, t, t) without one.
    Those voxels of an ``.mgz`` output, the untouched ones too, differ from the input's."""
    values = _mgh_values(img, stored_data(img))
    if values.dtype in MGH_DTYPES:
        return 0, values.dtype, values.dtype
    cast = values.astype(_smallest_mgh_dtype(values))
    return int(np.count_nonzero(cast != values)), values.dtype, cast.dtype


def _scaling(img: nib.spatialimages.SpatialImage) -> tuple[float, float]:
    """(slope, inter) of an image: in its header when built in memory, else on its proxy
    (nibabel moves a loaded file's scaling from the header to ``dataobj``)."""
    header = img.header.get_slope_inter() if hasattr(img.header, "get_slope_inter") else (None,)
    if header[0] is not None:
        slope, inter = header[0], header[1] if header[1] is not None else 0.0
    else:
        slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    slope = 1.0 if not np.isfinite(slope) or slope == 0 else float(slope)
    return slope, float(inter) if np.isfinite(inter) else 0.0


def _smallest_mgh_dtype(data: np.ndarray) -> type:
    """The smallest MGH type that holds integer ``data`` exactly; float32 otherwise."""
    if data.dtype.kind in "iu" and data.size:
        low, high = int(data.min()), int(data.max())
        for dtype in MGH_DTYPES[:-1]:
            if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
                return dtype
    return np.float32


def umask_mode() -> int:
    """The mode a new file gets under the user's umask (``0o666 & ~umask``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first: what making it makes."""
    return [f for f in (folder, *folder.parents) if not f.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove ``missing_folders``' list again, deepest first, as long as each is empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def cannot_write(path: str | Path, err: OSError) -> OutputError:
    """The one line for a file the file system would not write (``WRITE_ERRNOS``)."""
    return OutputError(f"cannot be written ({err.strerror or err})", path=path)


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = "", mode: int | None = None) -> Iterator[str]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` only on success.

    ``path`` thus either holds a complete file or is untouched, also when the process is killed
    (a killed write leaves only a hidden ``.<name>.*`` file, which ``remove_stale_temps`` clears).
    The file is fsynced before the rename and gets ``mode`` (default: what the umask implies).
    """
    path = Path(path)
    created = missing_folders(path.parent)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        yield tmp
        os.chmod(tmp, umask_mode() if mode is None else mode)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        remove_empty(created)
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            raise cannot_write(path, err) from err
        raise


def refused_write(err: BaseException) -> str | None:
    """The file system's reason when ``err`` is, or its text reports (a Nipype node's crash), a
    write it refused (``WRITE_ERRNOS``); else None."""
    if isinstance(err, OSError):
        return err.strerror if err.errno in WRITE_ERRNOS else None
    for match in _ERRNO_TEXT.finditer(str(err)):
        if int(match.group(1)) in WRITE_ERRNOS:
            return match.group(2).strip()
    return None


def work_folder_error(err: Exception, work: Path) -> OutputError | None:
    """An ``OutputError`` naming the work folder when the file system refused a write there (an
    output's own refusal names the output already), else None: a graph's intermediate files
    fill the work folder, which a temporary one hides from the user."""
    reason = refused_write(err)
    if reason is None or carried_error(err) is not None:
        return None
    return OutputError(
        f"the work folder cannot be written ({reason}): free space there, or give --work-dir "
        "on another disk",
        path=work,
    )


@contextmanager
def naming_work_folder(work: Path) -> Iterator[None]:
    """Run a graph: a write refused in its work folder is re-raised as ``work_folder_error``."""
    try:
        yield
    except Exception as err:
        if (named := work_folder_error(err, work)) is None:
            raise
        raise named from err


def remove_stale_temps(path: str | Path) -> None:
    """Temporary files of an earlier write of ``path`` that was killed before its rename."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*"):
        stale.unlink(missing_ok=True)


def write_text_atomic(text: str, path: str | Path, *, mode: int | None = None) -> Path:
    """Write a text file atomically (temp file + rename)."""
    with atomic_path(path, mode=mode) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def copy_atomic(src: str | Path, dst: str | Path, *, mode: int | None = None) -> Path:
    """Copy ``src`` to ``dst`` so that ``dst`` is either complete or untouched."""
    with atomic_path(dst, mode=mode) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file (following symlinks), else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: one resolved path, or (both existing) one inode."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    file_id = _file_id(a)
    return file_id is not None and file_id == _file_id(b)


def same_image(a: str | Path, b: str | Path) -> bool:
    """Whether ``b`` is a file of the image ``a`` (``same_file``, or its pair's other file)."""
    return any(same_file(f, b) for f in image_files(a))


class Publisher:
    """Publishes a run's files safely: never onto a file the run reads; all or nothing.

    Each file goes to a temp name in its target folder, is fsynced and renamed; with ``staged``
    the files of a folder wait in a hidden staging folder and appear together at its end.
    ``rollback`` (on a failed run) removes every file this publisher wrote.
    """

    def __init__(self, reads: Iterable[str | Path], *, force: bool = False) -> None:
        self.force = force
        self._read_paths: dict[Path, Path] = {}
        self._read_ids: dict[tuple[int, int], Path] = {}
        self._written: list[Path] = []
        self._claimed: set[Path] = set()
        self._stage: tuple[Path, Path] | None = None  # (final folder, staging folder)
        self._pending: list[tuple[Path, Path]] = []  # (staged file, final path)
        self.add_reads(reads)

    @property
    def written(self) -> list[Path]:
        """The final paths this publisher has written, in order."""
        return list(self._written)

    def add_reads(self, paths: Iterable[str | Path]) -> None:
        """More files the run reads (they are never written to), with a pair's partner file."""
        for path in (p for given in paths for p in image_files(given)):
            self._read_paths[path.resolve()] = path
            file_id = _file_id(path)
            if file_id is not None:
                self._read_ids[file_id] = path

    def refuse_reads(self, dst: str | Path) -> Path:
        """``dst`` unless it is (by path or inode) a file the run reads: ``OutputError``."""
        dst = Path(dst)
        read = self._read_paths.get(dst.resolve()) or self._read_ids.get(_file_id(dst) or (-1, -1))
        if read is not None:
            same = "" if str(read) == str(dst) else f" ({read}, the same file)"
            raise OutputError(f"the output would overwrite the input{same}; not written", path=dst)
        return dst

    def check(self, dst: str | Path) -> Path:
        """``dst`` if this run may write it, else raise ``OutputError`` naming it and why."""
        dst = self.refuse_reads(dst)
        if dst.is_dir():
            raise OutputError("is a folder, not a file the output can be written to", path=dst)
        folder = dst.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise OutputError(f"cannot be written: {folder} is a file, not a folder", path=dst)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"the output folder {folder} is not writable", path=dst)
        if dst.resolve() in self._claimed:
            raise OutputError("two outputs of this run have this name", path=dst)
        if os.path.lexists(dst) and not self.force:
            raise OutputError("already exists; give --force to overwrite it", path=dst)
        return dst

    def check_all(self, paths: Iterable[str | Path]) -> list[Path]:
        """Check every planned output before any work, also that no two of them coincide."""
        checked = []
        for path in paths:
            checked.append(self.check(path))
            self._claimed.add(Path(path).resolve())
        self._claimed.clear()
        return checked

    def save_volume(
        self, img: nib.spatialimages.SpatialImage, dst: str | Path, *, mode: int | None = None
    ) -> Path:
        """Write a volume (converted to MGH for ``.mgz``/``.mgh``) at ``dst``."""
        img, suffix = _in_format(img, dst, OutputError)
        return self._publish(dst, mode, suffix, lambda tmp: nib.save(img, tmp))

    def write_text(self, text: str, dst: str | Path, *, mode: int | None = None) -> Path:
        """Write a text file at ``dst``."""
        return self._publish(dst, mode, "", lambda tmp: Path(tmp).write_text(text))

    def write_bytes(self, data: bytes, dst: str | Path, *, mode: int | None = None) -> Path:
        """Write a binary file at ``dst``."""
        return self._publish(dst, mode, "", lambda tmp: Path(tmp).write_bytes(data))

    def copy(self, src: str | Path, dst: str | Path, *, mode: int | None = None) -> Path:
        """Copy ``src`` to ``dst`` (converting the volume format when the suffixes differ)."""
        self.add_reads([src])
        src_suffix, dst_suffix = split_suffix(src)[1], split_suffix(dst)[1]
        if dst_suffix and src_suffix != dst_suffix:
            return self.save_volume(nib.load(src), dst, mode=mode)
        return self._publish(dst, mode, "", lambda tmp: shutil.copyfile(src, tmp))

    @contextmanager
    def staged(self, folder: str | Path | None) -> Iterator[None]:
        """Files written under ``folder`` in this block appear there together at its end.

        They wait, complete and fsynced, in a hidden folder inside ``folder``; a failure in the
        block removes that folder, so none of them appears. The caller holds ``locked(folder)``,
        so staging folders left there by a killed run are removed.
        """
        if folder is None:
            yield
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
        self._stage = (folder.resolve(), staging)
        try:
            yield
            self._stage = None
            for staged_file, final in self._pending:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged_file, final)
                self._written.append(final)
            for final_folder in {final.parent for _, final in self._pending}:
                _fsync(final_folder)
        finally:
            self._stage = None
            self._pending = []
            shutil.rmtree(staging, ignore_errors=True)

    def rollback(self) -> None:
        """Remove every file this publisher wrote (files it replaced are not restored)."""
        for path in reversed(self._written):
            path.unlink(missing_ok=True)
        self._written = []

    def _publish(self, dst: str | Path, mode: int | None, suffix: str, write) -> Path:
        dst = self.check(dst)
        self._claimed.add(dst.resolve())
        target = dst
        if self._stage is not None and dst.resolve().is_relative_to(self._stage[0]):
            target = self._stage[1] / dst.resolve().relative_to(self._stage[0])
        try:
            with atomic_path(target, suffix=suffix, mode=mode) as tmp:
                write(tmp)
        except OutputError as err:
            if target is dst or err.path != str(target):
                raise
            raise OutputError(err.problem, path=dst) from err.__cause__  # not the staging name
        if target is dst:
            self._written.append(dst)
        else:
            self._pending.append((target, dst))
        return dst


@contextmanager
def locked(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a folder or file) for this block, or raise at once.

    The lock file is ``.<name>.lock`` beside ``path``; a second run on the same ``path`` gets an
    ``OutputError`` immediately instead of both runs failing half-way.
    """
    path = Path(path)
    lock_file = path.parent / f".{path.name}.lock"
    created = missing_folders(lock_file.parent)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"another mideface run is using this {what} (lock {lock_file}); "
                "wait for it to finish or choose another",
                path=path,
            ) from None
        if _file_id(lock_file) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            break
        os.close(fd)  # the holder before us removed the file we locked; lock the new one
    try:
        yield
    finally:
        lock_file.unlink(missing_ok=True)
        os.close(fd)
        remove_empty(created)  # the folders made for the lock, if the run left them empty


def maybe_locked(path: str | Path | None, what: str):
    """``locked(path, what)``, or nothing to lock when ``path`` is None."""
    return nullcontext() if path is None else locked(path, what)
