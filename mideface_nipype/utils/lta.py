"""FreeSurfer's linear transform array (LTA) text files, as ``mideface --apply`` takes them.

FreeSurfer's ``--apply VOL FACEMASK REG OUT`` takes an LTA (from ``mri_coreg``,
``bbregister``, ``lta_convert``) in either direction: when its source volume is the face
mask's, it is inverted. The format is read from its documented text: ``type`` (0 voxel to
voxel, 1 RAS to RAS), one 4x4 matrix, and the source and destination volume geometry
(``volume``, ``voxelsize``, ``xras``/``yras``/``zras`` direction cosines, ``cras`` centre).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mideface_nipype.utils.errors import InputError

#: LTA ``type`` values this reader converts: voxel to voxel, scanner RAS to RAS.
LINEAR_VOX_TO_VOX, LINEAR_RAS_TO_RAS = 0, 1
#: Two volume geometries are the same within this (mm, on every vox2ras entry), as FreeSurfer
#: compares them within 1e-3 (the LTA's printed digits cost about 1e-6).
SAME_GEOMETRY_MM = 1e-3


@dataclass(frozen=True)
class Geometry:
    """A volume's grid as an LTA records it: shape and voxel-to-RAS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def matches(self, shape: tuple[int, ...], affine: np.ndarray) -> bool:
        return tuple(shape[:3]) == self.shape and np.allclose(
            affine, self.affine, rtol=0.0, atol=SAME_GEOMETRY_MM
        )


@dataclass(frozen=True)
class Lta:
    """An LTA's transform as RAS mm (source -> destination points) and its two geometries
    (``None`` where the file marks them invalid)."""

    ras_to_ras: np.ndarray
    src: Geometry | None
    dst: Geometry | None


def _geometry(fields: dict[str, list[float]]) -> Geometry | None:
    """FreeSurfer's vox2ras of a volume info block: direction cosines times voxel sizes, the
    centre voxel (dims / 2) at ``cras``."""
    if not fields or fields.get("valid", [0])[0] != 1:
        return None
    dims = np.asarray(fields["volume"][:3], dtype=float)
    cosines = np.column_stack([fields["xras"], fields["yras"], fields["zras"]])
    scaled = cosines * np.asarray(fields["voxelsize"][:3], dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = scaled
    affine[:3, 3] = np.asarray(fields["cras"], dtype=float) - scaled @ (dims / 2.0)
    return Geometry(tuple(int(d) for d in dims), affine)


def _parse(text: str) -> tuple[int, np.ndarray, dict, dict]:
    """(type, 4x4 matrix, source info, destination info) of an LTA's text."""
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    header = {}
    blocks: dict[str, dict[str, list[float]]] = {"src": {}, "dst": {}}
    block = None
    matrix_rows: list[list[float]] = []
    k = 0
    while k < len(lines):
        line = lines[k]
        words = line.split()
        if line.startswith(("src volume info", "dst volume info")):
            block = blocks[words[0]]
        elif "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            target = block if block is not None else header
            if key != "filename":
                target[key] = [float(v) for v in value.split()]
        elif len(words) == 3 and words[1:] == ["4", "4"] and not matrix_rows:
            matrix_rows = [[float(v) for v in lines[k + i].split()] for i in range(1, 5)]
            k += 4
        k += 1
    if "type" not in header or len(matrix_rows) != 4 or any(len(r) != 4 for r in matrix_rows):
        raise ValueError("no 'type' line or no 4x4 matrix")
    if header.get("nxforms", [1])[0] != 1:
        raise ValueError(f"{int(header['nxforms'][0])} transforms; one is needed")
    return int(header["type"][0]), np.asarray(matrix_rows), blocks["src"], blocks["dst"]


def load_lta(path: str | Path) -> Lta:
    """An LTA file's transform as RAS mm; ``InputError`` naming the file if it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise InputError("registration file not found", path=path)
    try:
        kind, matrix, src_fields, dst_fields = _parse(path.read_text())
        src, dst = _geometry(src_fields), _geometry(dst_fields)
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())
        raise InputError(f"is not a readable FreeSurfer LTA ({reason})", path=path) from err
    if kind == LINEAR_VOX_TO_VOX:
        if src is None or dst is None:
            raise InputError("a voxel-to-voxel LTA without valid volume info", path=path)
        matrix = dst.affine @ matrix @ np.linalg.inv(src.affine)
    elif kind != LINEAR_RAS_TO_RAS:
        raise InputError(
            f"LTA type {kind}; only 0 (LINEAR_VOX_TO_VOX) and 1 (LINEAR_RAS_TO_RAS) are read "
            "(lta_convert --inlta REG --outlta OUT.lta writes type 1)",
            path=path,
        )
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-6:
        raise InputError("its matrix is not an invertible affine", path=path)
    return Lta(matrix, src, dst)


def vol_to_mask_ras(path: str | Path, vol, facemask) -> np.ndarray:
    """The LTA at ``path`` as ``--apply``'s REG (VOL mm -> FACEMASK mm), inverted when its
    source is FACEMASK's grid (as FreeSurfer does); ``InputError`` when its recorded source
    is neither image's grid, which would deface the wrong place."""
    lta = load_lta(path)
    if lta.src is None or lta.src.matches(vol.shape, vol.affine):
        return lta.ras_to_ras
    if lta.src.matches(facemask.shape, facemask.affine):
        return np.linalg.inv(lta.ras_to_ras)
    raise InputError(
        f"its source volume ({'x'.join(map(str, lta.src.shape))} voxels) is neither the image "
        "to deface nor the face mask's grid; give the LTA between these two",
        path=path,
    )
