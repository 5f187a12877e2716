"""QA pictures without a display: a z-buffer mesh rasteriser and a dependency-free PNG writer."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

#: Camera yaw (degrees about the S axis) of each named view; 0 looks at the face.
VIEWS_DEG = {"front": 0.0, "left": -90.0, "right": 90.0, "three-quarter": 30.0}
PIXEL_MM = 0.75


def render_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    *,
    view: str = "front",
    vertex_colors: np.ndarray | None = None,
    pixel_mm: float = PIXEL_MM,
) -> np.ndarray:
    """Orthographic Lambert-shaded render (RGB uint8) of a mesh in RAS mm.

    Triangles are sampled densely enough (half a pixel) that the z-buffer has no gaps.
    """
    yaw = np.deg2rad(VIEWS_DEG[view])
    cam = np.array([np.sin(yaw), np.cos(yaw), 0.0])  # towards the camera
    right = np.array([-np.cos(yaw), np.sin(yaw), 0.0])  # image columns
    up = np.array([0.0, 0.0, 1.0])
    v = np.asarray(vertices, dtype=float)
    f = np.asarray(faces)
    colours = (
        np.full((len(v), 3), 200.0) if vertex_colors is None else np.asarray(vertex_colors, float)
    )
    tri = v[f]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    face_n /= np.linalg.norm(face_n, axis=1, keepdims=True) + 1e-12
    shade = np.abs(face_n @ cam) * 0.8 + 0.2  # two-sided: winding need not be known
    edge = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max()
    n = max(2, int(np.ceil(edge / (pixel_mm / 2))))
    a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = a + b <= n
    bary = np.stack([a[keep], b[keep], n - a[keep] - b[keep]], axis=1) / n  # (S, 3)
    cols = v @ right
    rows = v @ up
    depth = v @ cam
    col0, row1 = cols.min() - 5 * pixel_mm, rows.max() + 5 * pixel_mm
    width = int(np.ceil((cols.max() - col0) / pixel_mm)) + 6
    height = int(np.ceil((row1 - rows.min()) / pixel_mm)) + 6
    image = np.zeros((height * width, 3), dtype=np.uint8)
    zbuf_pix, zbuf_val = [], []
    chunk = max(1, 4_000_000 // len(bary))
    for start in range(0, len(f), chunk):
        fi = f[start : start + chunk]
        c = (bary @ cols[fi].T).T
        r = (bary @ rows[fi].T).T
        d = (bary @ depth[fi].T).T
        px = ((c - col0) / pixel_mm).astype(int) + (((row1 - r) / pixel_mm).astype(int)) * width
        colour = (
            np.einsum("sk,fkc->fsc", bary, colours[fi]) * shade[start : start + chunk, None, None]
        )
        zbuf_pix.append(px.ravel())
        zbuf_val.append((d.ravel(), colour.reshape(-1, 3)))
    pix = np.concatenate(zbuf_pix)
    dep = np.concatenate([z[0] for z in zbuf_val])
    col = np.concatenate([z[1] for z in zbuf_val])
    order = np.lexsort((-dep, pix))
    first = np.unique(pix[order], return_index=True)[1]
    winners = order[first]
    image[pix[winners]] = np.clip(col[winners], 0, 255).astype(np.uint8)
    return image.reshape(height, width, 3)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 array as PNG (zlib only; no imaging library needed)."""
    img = np.asarray(image, dtype=np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    height, width, _ = img.shape
    raw = np.concatenate([np.zeros((height, 1), np.uint8), img.reshape(height, -1)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
    png += chunk(b"IEND", b"")
    path = Path(path)
    path.write_bytes(png)
    return path


#: Outline colours of segmentation labels 0-6 (air, soft, bone, csf, gm, wm, eyes).
LABEL_COLOURS = np.array(
    [
        [0, 0, 0],
        [230, 160, 90],
        [250, 250, 250],
        [60, 120, 255],
        [120, 220, 120],
        [250, 220, 60],
        [255, 40, 40],
    ],
    dtype=np.uint8,
)


def label_slices(data: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Sagittal, coronal and axial slices through the head centre, label borders drawn in colour.

    Arrays are reoriented to RAS through the affine first, so every subject is shown alike.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    img = nib.orientations.apply_orientation(np.asarray(data, dtype=np.float32), ornt)
    lab = nib.orientations.apply_orientation(np.asarray(labels), ornt)
    centre = np.round(np.argwhere(lab > 0).mean(0)).astype(int)
    hi = np.percentile(img[lab > 0], 99) if (lab > 0).any() else img.max()
    panels = []
    for axis in range(3):
        grey = np.clip(np.take(img, centre[axis], axis=axis) / max(hi, 1e-6), 0, 1) * 255
        sl = np.take(lab, centre[axis], axis=axis)
        rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
        border = np.zeros(sl.shape, dtype=bool)
        border[1:, :] |= sl[1:, :] != sl[:-1, :]
        border[:, 1:] |= sl[:, 1:] != sl[:, :-1]
        rgb[border] = LABEL_COLOURS[np.clip(sl[border], 0, len(LABEL_COLOURS) - 1)]
        panels.append(np.transpose(rgb, (1, 0, 2))[::-1])  # rows = superior first
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    return np.concatenate(padded, axis=1)
