"""Headless renders of the skin surface: what a face-recognition attacker (and a QA reader) sees.

The skin is the iso-surface of the image at a robust threshold (half of Otsu's, as in the published
attack), restricted to the largest connected component with its holes filled. Renders are
orthographic z-buffer rasterisations with interpolated vertex normals and Lambert shading: no
display, OpenGL or ray tracer is needed, and two renders with the same ``frame`` are aligned pixel
for pixel, so before/after pictures and depth maps can be compared directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh
from scipy import ndimage

from mideface_nipype.utils.geometry import apply_affine

#: Yaw of each named view in degrees about the superior axis; 0 looks at the face (from anterior),
#: positive turns the camera towards the subject's left.
VIEWS_DEG = {"front": 0.0, "left": 90.0, "right": -90.0, "three-quarter": 30.0}
#: Pixel size of renders (mm); 0.5 mm resolves the nose, lips and eyelids.
PIXEL_MM = 0.5
#: Fraction of Otsu's threshold taken as the skin level (dark skin edges still count as head).
OTSU_FRACTION = 0.5
#: Gaussian smoothing (voxels) before the iso-surface: removes single-voxel noise, keeps the face.
SKIN_SMOOTH_VOX = 0.7
#: Light from the camera, with this much ambient light.
AMBIENT = 0.15


def skin_level(data: np.ndarray) -> float:
    """Half of Otsu's threshold of the volume: the intensity that separates skin from air."""
    from skimage.filters import threshold_otsu

    values = np.asarray(data, dtype=np.float32)
    return float(threshold_otsu(values[::2, ::2, ::2]) * OTSU_FRACTION)


def skin_volume(data: np.ndarray, level: float) -> np.ndarray:
    """Smoothed intensities with everything outside the head's filled largest component zeroed.

    Zeroing the background and filling the inside gives one closed skin surface with no noise
    islands in the air and no inner surfaces (sinuses, ventricles) behind it.
    """
    smooth = ndimage.gaussian_filter(np.asarray(data, dtype=np.float32), SKIN_SMOOTH_VOX)
    inside = smooth > level
    labels, n = ndimage.label(inside)
    if n == 0:
        raise ValueError("no voxel is above the skin level: no head to render")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    head = ndimage.binary_fill_holes(labels == sizes.argmax())
    vol = np.where(ndimage.binary_dilation(head, iterations=2), smooth, 0.0)
    vol[head] = np.maximum(vol[head], 2 * level)  # the filled inside is solid
    return vol.astype(np.float32)


def skin_mesh(
    data: np.ndarray, affine: np.ndarray, *, level: float | None = None
) -> trimesh.Trimesh:
    """The skin surface in world (scanner RAS) mm, through the affine, whatever the orientation."""
    from skimage.measure import marching_cubes

    data = np.asarray(data, dtype=np.float32)
    level = skin_level(data) if level is None else level
    vol = np.pad(skin_volume(data, level), 1)  # a closed surface also where the head meets the box
    verts, faces, _, _ = marching_cubes(vol, level)
    verts = apply_affine(affine, verts - 1)
    # marching cubes winds its triangles with normals into the bright side; turn them out of the
    # head, and back again where the affine mirrors the voxel axes
    if np.linalg.det(affine[:3, :3]) > 0:
        faces = faces[:, ::-1]
    return trimesh.Trimesh(verts, faces, process=False)


def camera(yaw_deg: float, pitch_deg: float = 0.0) -> np.ndarray:
    """Rows (right, up, towards the camera) of an orthographic camera looking at the face.

    yaw 0 sees the face from the front (camera at +A); the camera turns about the S axis, then
    tilts by ``pitch_deg`` (positive looks from above).
    """
    yaw, pitch = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    towards = np.array([-np.sin(yaw) * np.cos(pitch), np.cos(yaw) * np.cos(pitch), np.sin(pitch)])
    right = np.array([np.cos(yaw), np.sin(yaw), 0.0])  # the subject's left is on the image right
    up = np.cross(right, towards)
    return np.stack([right, up, towards])


@dataclass(frozen=True)
class Frame:
    """The image plane of a render: bounds (mm in camera coordinates) and pixel size."""

    col0_mm: float
    row0_mm: float
    width: int
    height: int
    pixel_mm: float = PIXEL_MM

    @classmethod
    def around(cls, points: np.ndarray, cam: np.ndarray, pixel_mm: float = PIXEL_MM) -> Frame:
        """A frame that holds ``points`` (world mm) seen by ``cam``, with a small border."""
        proj = np.asarray(points) @ cam[:2].T
        lo, hi = proj.min(0) - 5 * pixel_mm, proj.max(0) + 5 * pixel_mm
        width, height = (np.ceil((hi - lo) / pixel_mm).astype(int) + 1).tolist()
        return cls(float(lo[0]), float(hi[1]), width, height, pixel_mm)


@dataclass(frozen=True)
class Render:
    """Shaded grey image (0-1) and depth towards the camera (mm; NaN where no surface)."""

    shade: np.ndarray
    depth: np.ndarray

    @property
    def hit(self) -> np.ndarray:
        return np.isfinite(self.depth)

    def rgb(self, colours: np.ndarray | None = None) -> np.ndarray:
        """uint8 RGB picture: grey shading, or shading times per-pixel colours (0-255)."""
        shade = np.nan_to_num(self.shade)[..., None]
        base = np.full(self.shade.shape + (3,), 235.0) if colours is None else colours
        return np.clip(shade * base, 0, 255).astype(np.uint8)


def rasterise(
    vertices: np.ndarray,
    faces: np.ndarray,
    cam: np.ndarray,
    frame: Frame,
    *,
    vertex_values: np.ndarray | None = None,
) -> tuple[Render, np.ndarray | None]:
    """Z-buffer render of a mesh; also the nearest surface's interpolated ``vertex_values``.

    Every triangle tests the pixel centres of its bounding box (triangles are grouped by box size,
    so this is vectorised); the nearest covering triangle wins each pixel. Normals and values are
    interpolated from the vertices (smooth shading), two-sided so the winding need not be known.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    normals = np.asarray(trimesh.Trimesh(v, f, process=False).vertex_normals)
    cols, rows, depth = (v @ cam.T).T
    x = (cols - frame.col0_mm) / frame.pixel_mm - 0.5  # pixel-centre coordinates
    y = (frame.row0_mm - rows) / frame.pixel_mm - 0.5
    tx, ty = x[f], y[f]  # (F, 3)
    x0, y0 = np.ceil(tx.min(1)).astype(np.int64), np.ceil(ty.min(1)).astype(np.int64)
    size = np.maximum(np.floor(tx.max(1)) - x0, np.floor(ty.max(1)) - y0).astype(np.int64) + 1
    area = (tx[:, 1] - tx[:, 0]) * (ty[:, 2] - ty[:, 0]) - (tx[:, 2] - tx[:, 0]) * (
        ty[:, 1] - ty[:, 0]
    )
    usable = (size > 0) & (np.abs(area) > 1e-12)
    found_pix, found_depth, found_face, found_w = [], [], [], []
    for k in np.unique(size[usable]):  # a handful of box sizes, not a loop over triangles
        sel = np.flatnonzero(usable & (size == k))
        dy, dx = np.divmod(np.arange(k * k), k)
        px = x0[sel, None] + dx[None, :]  # (n, k*k)
        py = y0[sel, None] + dy[None, :]
        ax, ay = tx[sel, :1], ty[sel, :1]
        bx, by = tx[sel, 1:2] - ax, ty[sel, 1:2] - ay
        cx, cy = tx[sel, 2:] - ax, ty[sel, 2:] - ay
        qx, qy = px - ax, py - ay
        inv = 1.0 / area[sel, None]
        w1 = (qx * cy - qy * cx) * inv
        w2 = (bx * qy - by * qx) * inv
        w0 = 1 - w1 - w2
        inside = (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
        inside &= (px >= 0) & (px < frame.width) & (py >= 0) & (py < frame.height)
        rows_i, cols_i = np.nonzero(inside)
        weights = np.stack([w0[inside], w1[inside], w2[inside]], axis=1)
        face = sel[rows_i]
        found_pix.append(py[inside] * frame.width + px[inside])
        found_depth.append(np.einsum("hk,hk->h", weights, depth[f[face]]))
        found_face.append(face)
        found_w.append(weights)
    npix = frame.width * frame.height
    shape = (frame.height, frame.width)
    if not found_pix:
        return Render(np.full(shape, np.nan), np.full(shape, np.nan)), None
    pix = np.concatenate(found_pix)
    dep = np.concatenate(found_depth)
    order = np.lexsort((-dep, pix))
    first = order[np.unique(pix[order], return_index=True)[1]]
    pix, dep = pix[first], dep[first]
    face = np.concatenate(found_face)[first]
    weights = np.concatenate(found_w)[first]
    corner = f[face]
    normal = np.einsum("hk,hkc->hc", weights, normals[corner])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-12
    shade = np.full(npix, np.nan)
    shade[pix] = AMBIENT + (1 - AMBIENT) * np.abs(normal @ cam[2])
    depth_img = np.full(npix, np.nan)
    depth_img[pix] = dep
    values = None
    if vertex_values is not None:
        vals = np.asarray(vertex_values, dtype=np.float64).reshape(len(v), -1)
        values = np.full((npix, vals.shape[1]), np.nan)
        values[pix] = np.einsum("hk,hkc->hc", weights, vals[corner])
        values = values.reshape(*shape, -1)
    return Render(shade.reshape(shape), depth_img.reshape(shape)), values


def render_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    *,
    view: str = "front",
    vertex_colors: np.ndarray | None = None,
    pixel_mm: float = PIXEL_MM,
) -> np.ndarray:
    """RGB picture (uint8) of a mesh in RAS mm from a named view, coloured per vertex if given."""
    cam = camera(VIEWS_DEG[view])
    frame = Frame.around(vertices, cam, pixel_mm)
    render, colours = rasterise(vertices, faces, cam, frame, vertex_values=vertex_colors)
    return render.rgb(None if colours is None else np.nan_to_num(colours))
