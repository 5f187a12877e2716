"""QA of one defaced head: before/after pictures, the dist-to-face check, report.html, sidecars.

MiDeFace's ``--pics`` renders the head surface with freeview under a virtual X display, in the
atlas pose, and ``mris_diff --min-dist`` measures where the defaced head surface still coincides
with the original one (``dist-to-face``). Here the skin surfaces and renders come from
:mod:`mideface_nipype.reports.render` (no display, no OpenGL) and the distances from exact
point-to-triangle distances; the report is one self-contained HTML file (pictures embedded) that
opens offline.
"""

from __future__ import annotations

import base64
import html
import json
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import trimesh
from scipy import ndimage
from scipy.spatial import cKDTree

from mideface_nipype import __version__
from mideface_nipype.reports import render
from mideface_nipype.utils import io
from mideface_nipype.utils.geometry import apply_affine, voxel_sizes

#: Grid (mm) the skin surfaces are built on: finer heads are resampled, which keeps ``--pics`` to
#: seconds (a 0.9 mm head gives 1.2 M triangles, 0.4 M at 1.5 mm) and still shows nose and lips.
MESH_VOXEL_MM = 1.5
#: Pixel size of the pictures (mm in the atlas pose).
PICS_PIXEL_MM = 0.75
#: Display pixel size of the slices (mm).
SLICE_PIXEL_MM = 1.0
#: MiDeFace's dist-to-face threshold: original skin this close to the defaced skin "coincides".
COINCIDE_MM = 1.0
#: Triangles (nearest centroids) tested per vertex for its distance to the other surface.
NEAREST_TRIANGLES = 16
#: Only triangles this far beyond the face's bounding box are searched (mm).
SEARCH_MARGIN_MM = 10.0
#: Warnings: registration head Dice below this (it is refused below register.MIN_HEAD_DICE) ...
WARN_HEAD_DICE = 0.85
#: ... more than this fraction of the face's skin still within COINCIDE_MM of the defaced skin
#: (the defaced skin follows the template, an average face pushed outward by
#: ``bracket.FACE_OFFSET_MM`` so that it lies outside most of the true one: 7-15 % of the face
#: on the real heads here, 24-37 % without the push; more than half means the face was largely
#: missed) ...
WARN_COINCIDE_FRACTION = 0.5
#: ... and more than this much face tissue (mm^2) on the edge of the field of view.
WARN_FOV_CUT_MM2 = 100.0
#: Time each frame of the before/after GIF is shown.
GIF_FRAME_MS = 800
#: Outline colours of face-mask compartments 1-4 and of the exclusion mask.
COMPARTMENT_RGB = np.array(
    [[255, 150, 40], [255, 235, 60], [60, 210, 255], [80, 110, 255]], dtype=np.uint8
)
XMASK_RGB = np.array([255, 40, 40], dtype=np.uint8)
#: dist-to-face picture: skin, face labels, and face skin that still coincides.
SKIN_RGB, FACE_RGB, COINCIDE_RGB = (235, 235, 235), (120, 175, 245), (245, 50, 50)
#: The pictures, in report order, with their captions.
PICTURES = {
    "face-before.png": "Skin before defacing in the atlas pose: front, left, right, three-quarter.",
    "face-after.png": "Skin after defacing, same views, pixel for pixel aligned with the above.",
    "face-before+after.gif": "Before and after, alternating.",
    "dist-to-face.png": f"Original skin: the defaced region in blue; in red where the defaced "
    f"skin still lies within {COINCIDE_MM:g} mm of it (MiDeFace's dist-to-face).",
    "slices.png": "Sagittal, coronal and axial slices through the face, before (top) and after "
    "(bottom); outlines: compartments 1-4 orange, yellow, cyan, blue; exclusion mask red.",
}
#: Packages whose versions the report lists.
VERSIONED = ("nipype", "nibabel", "numpy", "scipy", "antspyx", "trimesh", "scikit-image")
#: The sections of ``stats.json``, one per step record, in file order: name -> what it holds.
#: ``CollectStats`` has one input of each name; the ``PER_IMAGE_SECTIONS`` are lists (one
#: record per other contrast), every other section one record.
STATS_SECTIONS = {
    "head_mask": "HeadMask: head volume",
    "registration": "RegisterAtlas: head-mask Dice of the atlas registration",
    "exclusion": "Segment or AtlasExclusionMask: how the exclusion mask was made",
    "bracket": "Bracket: compartment voxels, labels, blended bounds",
    "fill": "Deface: fill statistics, provenance-code location",
    "coregister": "Coregister: each other contrast's rigid registration",
    "apply": "ApplyFaceMask: each other contrast's fill statistics",
    "pics": "Pics: the dist-to-face check",
}
PER_IMAGE_SECTIONS = ("coregister", "apply")
#: The ``Description`` of every defaced image's JSON sidecar (``--odir`` and BIDS).
DEFACED_DESCRIPTION = f"defaced by mideface-nipype {__version__} (MiDeFace)"


# ----------------------------------------------------------------------------- surfaces, distance


def resample_for_mesh(
    data: np.ndarray, affine: np.ndarray, voxel_mm: float = MESH_VOXEL_MM
) -> tuple[np.ndarray, np.ndarray]:
    """The volume on a grid no finer than ``voxel_mm`` (linear interpolation) and its affine."""
    zooms = voxel_sizes(affine)
    step = np.maximum(1.0, voxel_mm / zooms)
    data = np.asarray(data, dtype=np.float32)
    if np.all(step == 1.0):
        return data, affine
    shape = tuple(int(n) for n in np.floor((np.array(data.shape) - 1) / step) + 1)
    out = ndimage.affine_transform(data, np.diag(step), output_shape=shape, order=1)
    return out, affine @ np.diag([*step, 1.0])


def head_surfaces(
    original: np.ndarray, defaced: np.ndarray, affine: np.ndarray
) -> tuple[trimesh.Trimesh, trimesh.Trimesh]:
    """Skin surfaces (subject mm) of the original and the defaced head on one grid, both at the
    original's skin level, so that skin defacing left alone gives identical vertices."""
    before, grid = resample_for_mesh(original, affine)
    after, _ = resample_for_mesh(defaced, affine)
    level = render.skin_level(before)
    return render.skin_mesh(before, grid, level=level), render.skin_mesh(after, grid, level=level)


def vertex_labels(vertices: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The label of the voxel nearest each vertex (world mm); 0 outside the volume."""
    ijk = np.rint(apply_affine(np.linalg.inv(affine), vertices)).astype(np.int64)
    inside = np.all((ijk >= 0) & (ijk < np.array(labels.shape[:3])), axis=1)
    out = np.zeros(len(ijk), dtype=labels.dtype)
    out[inside] = labels[tuple(ijk[inside].T)]
    return out


def vertex_areas(mesh: trimesh.Trimesh) -> np.ndarray:
    """Skin area (mm^2) each vertex stands for: a third of each triangle around it."""
    faces = np.asarray(mesh.faces)
    return np.bincount(
        faces.ravel(), np.repeat(mesh.area_faces / 3.0, 3), minlength=len(mesh.vertices)
    )


def surface_distance(points: np.ndarray, mesh: trimesh.Trimesh) -> np.ndarray:
    """Distance (mm) from each point to the surface ``mesh``.

    Exact point-to-triangle distances to the ``NEAREST_TRIANGLES`` triangles whose centroids are
    nearest: exact wherever the surface is within a few mm (all the 1 mm check needs), an upper
    bound beyond. Only triangles near the points' bounding box are searched.
    """
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        return np.zeros(0)
    triangles = np.asarray(mesh.triangles)
    centres = triangles.mean(axis=1)
    lo = points.min(0) - SEARCH_MARGIN_MM
    hi = points.max(0) + SEARCH_MARGIN_MM
    near = np.all((centres > lo) & (centres < hi), axis=1)
    if not near.any():
        return np.full(len(points), np.inf)
    triangles, centres = triangles[near], centres[near]
    k = min(NEAREST_TRIANGLES, len(triangles))
    _, idx = cKDTree(centres).query(points, k=k)
    idx = np.asarray(idx).reshape(len(points), k)
    repeated = np.repeat(points, k, axis=0)
    closest = trimesh.triangles.closest_point(triangles[idx.ravel()], repeated)
    return np.linalg.norm(closest - repeated, axis=1).reshape(-1, k).min(axis=1)


def dist_to_face(
    before: trimesh.Trimesh, after: trimesh.Trimesh, face_mask: np.ndarray, affine: np.ndarray
) -> np.ndarray:
    """Per vertex of the original skin: its distance (mm) to the defaced skin inside the face
    labels (the voxel nearest the vertex is in a face-mask compartment), NaN elsewhere."""
    vertices = np.asarray(before.vertices)
    in_face = vertex_labels(vertices, np.asarray(face_mask), affine) > 0
    dist = np.full(len(vertices), np.nan)
    dist[in_face] = surface_distance(vertices[in_face], after)
    return dist


def coincidence(dist_mm: np.ndarray, area_mm2: np.ndarray) -> dict:
    """Area of the face's original skin still within ``COINCIDE_MM`` of the defaced skin.

    ``coincide_fraction`` is the number to threshold: 0 when every bit of the true face moved.
    """
    in_face = np.isfinite(dist_mm)
    within = in_face & (np.nan_to_num(dist_mm, nan=np.inf) <= COINCIDE_MM)
    face_area = float(area_mm2[in_face].sum())
    within_area = float(area_mm2[within].sum())
    return {
        "coincide_mm": COINCIDE_MM,
        "face_area_mm2": round(face_area, 1),
        "coincide_area_mm2": round(within_area, 1),
        "coincide_fraction": round(within_area / face_area, 4) if face_area else 0.0,
        "face_vertices": int(in_face.sum()),
        "median_dist_mm": round(float(np.median(dist_mm[in_face])), 2) if in_face.any() else None,
    }


# ----------------------------------------------------------------------------- pictures


@dataclass(frozen=True)
class Posed:
    """A mesh mapped into the atlas pose, with outward triangle normals for back-face culling."""

    vertices: np.ndarray
    faces: np.ndarray
    outward: np.ndarray

    @classmethod
    def of(cls, mesh: trimesh.Trimesh, subject_to_atlas: np.ndarray) -> Posed:
        vertices = apply_affine(subject_to_atlas, mesh.vertices)
        faces = np.asarray(mesh.faces)
        tri = vertices[faces]
        normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        signed_volume = np.einsum("ij,ij->", tri[:, 0], normals)  # 6x the enclosed volume
        return cls(vertices, faces, normals * np.sign(signed_volume))

    def facing(self, cam: np.ndarray) -> np.ndarray:
        """The triangles turned towards the camera: on a closed surface the only visible ones,
        so the renders are identical in depth at half the cost."""
        return self.faces[self.outward @ cam[2] > 0]


@dataclass(frozen=True)
class ViewPair:
    """One view of the original and the defaced skin, in the same frame."""

    before: render.Render
    after: render.Render
    coloured: np.ndarray | None  # the original skin coloured per vertex (uint8 RGB), if asked


def render_pair(
    before: trimesh.Trimesh,
    after: trimesh.Trimesh,
    subject_to_atlas: np.ndarray,
    *,
    colours: np.ndarray | None = None,
    pixel_mm: float = PICS_PIXEL_MM,
) -> dict[str, ViewPair]:
    """Both skins from every view in ``render.VIEWS_DEG``, in the atlas pose (every subject seen
    from the same viewpoint); one frame per view, so before and after align pixel for pixel.
    ``colours`` (per vertex of ``before``, 0-255 RGB) also gives a coloured picture of it."""
    posed = [Posed.of(mesh, subject_to_atlas) for mesh in (before, after)]
    everything = np.vstack([p.vertices for p in posed])
    out = {}
    for view, yaw in render.VIEWS_DEG.items():
        cam = render.camera(yaw)
        frame = render.Frame.around(everything, cam, pixel_mm)
        rb, values = render.rasterise(
            posed[0].vertices, posed[0].facing(cam), cam, frame, vertex_values=colours
        )
        ra, _ = render.rasterise(posed[1].vertices, posed[1].facing(cam), cam, frame)
        coloured = None if values is None else rb.rgb(np.nan_to_num(values))
        out[view] = ViewPair(rb, ra, coloured)
    return out


def montage(images: list[np.ndarray], *, gap: int = 4, axis: int = 1) -> np.ndarray:
    """Pictures side by side (``axis=1``) or stacked (``axis=0``), black between them."""
    other = 1 - axis
    size = max(img.shape[other] for img in images)
    padded = []
    for i, img in enumerate(images):
        pad = [(0, 0), (0, 0), (0, 0)]
        pad[other] = (0, size - img.shape[other])
        pad[axis] = (0, gap if i < len(images) - 1 else 0)
        padded.append(np.pad(img, pad))
    return np.concatenate(padded, axis=axis)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def outlined_slices(
    volumes: list[np.ndarray],
    face_mask: np.ndarray,
    xmask: np.ndarray | None,
    affine: np.ndarray,
) -> np.ndarray:
    """Sagittal, coronal and axial slices through the face-mask centre, one row per volume, with
    the compartments and the exclusion mask outlined; reoriented to RAS through the affine and
    shown with square ``SLICE_PIXEL_MM`` pixels whatever the voxel size."""
    ornt = nib.orientations.io_orientation(affine)
    zooms = voxel_sizes(affine)[ornt[:, 0].astype(int)]

    def ras(a: np.ndarray) -> np.ndarray:
        return nib.orientations.apply_orientation(np.asarray(a), ornt)

    labels = ras(face_mask)
    protected = ras(xmask > 0.5) if xmask is not None else np.zeros(labels.shape, bool)
    found = np.argwhere(labels > 0)
    centre = np.round(found.mean(0) if len(found) else np.array(labels.shape) / 2).astype(int)
    rows = []
    for vol in volumes:
        img = ras(np.asarray(vol, dtype=np.float32))
        top = max(float(np.percentile(img, 99.5)), 1e-6)
        panels = []
        for axis in range(3):
            factors = np.delete(zooms, axis) / SLICE_PIXEL_MM

            def cut(a: np.ndarray, order: int, axis=axis, factors=factors) -> np.ndarray:
                return ndimage.zoom(np.take(a, centre[axis], axis=axis), factors, order=order)

            grey = np.clip(cut(img, 1) / top, 0, 1) * 255
            rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
            lab = cut(labels, 0)
            for k, colour in enumerate(COMPARTMENT_RGB, start=1):
                rgb[_outline(lab == k)] = colour
            rgb[_outline(cut(protected.astype(np.uint8), 0) > 0)] = XMASK_RGB
            panels.append(np.transpose(rgb, (1, 0, 2))[::-1])  # rows: superior first
        rows.append(montage(panels))
    return montage(rows, axis=0)


@dataclass(frozen=True)
class QAPictures:
    """Everything ``--pics`` produces for one head (pictures as uint8 RGB arrays)."""

    face_before: np.ndarray
    face_after: np.ndarray
    dist_to_face_rgb: np.ndarray
    slices: np.ndarray
    head_surface: trimesh.Trimesh
    defaced_surface: trimesh.Trimesh
    dist_mm: np.ndarray
    record: dict


def qa_pictures(
    original: np.ndarray,
    defaced: np.ndarray,
    affine: np.ndarray,
    subject_to_atlas: np.ndarray,
    face_mask: np.ndarray,
    xmask: np.ndarray | None = None,
) -> QAPictures:
    """Skin surfaces, dist-to-face, the four views before and after, and the outlined slices.

    ``original`` and ``defaced`` are 3-D volumes on one grid (``affine``), ``subject_to_atlas``
    the 4x4 RAS matrix (subject mm -> atlas mm) that puts every head in the same pose.
    """
    before, after = head_surfaces(original, defaced, affine)
    dist = dist_to_face(before, after, face_mask, affine)
    colours = np.tile(np.array(SKIN_RGB, float), (len(dist), 1))
    colours[np.isfinite(dist)] = FACE_RGB
    colours[np.nan_to_num(dist, nan=np.inf) <= COINCIDE_MM] = COINCIDE_RGB
    views = render_pair(before, after, subject_to_atlas, colours=colours)
    record = {
        "dist_to_face": coincidence(dist, vertex_areas(before)),
        "mesh_voxel_mm": MESH_VOXEL_MM,
        "pixel_mm": PICS_PIXEL_MM,
        "views": list(views),
        "triangles": [len(before.faces), len(after.faces)],
    }
    return QAPictures(
        face_before=montage([v.before.rgb() for v in views.values()]),
        face_after=montage([v.after.rgb() for v in views.values()]),
        dist_to_face_rgb=montage([v.coloured for v in views.values()]),
        slices=outlined_slices([original, defaced], face_mask, xmask, affine),
        head_surface=before,
        defaced_surface=after,
        dist_mm=dist,
        record=record,
    )


def save_gif(frames: list[np.ndarray], path: str | Path, frame_ms: int = GIF_FRAME_MS) -> Path:
    """A looping animated GIF of same-size RGB frames (Pillow: scikit-image and antspyx both
    require it, so it is always installed)."""
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)).quantize(256) for f in frames]
    path = Path(path)
    images[0].save(
        path, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0
    )
    return path


def save_mesh(mesh: trimesh.Trimesh, path: str | Path) -> Path:
    """A surface as GIfTI (world mm), readable by any surface viewer."""
    img = nib.gifti.GiftiImage(
        darrays=[
            nib.gifti.GiftiDataArray(
                np.asarray(mesh.vertices, np.float32), intent="NIFTI_INTENT_POINTSET"
            ),
            nib.gifti.GiftiDataArray(
                np.asarray(mesh.faces, np.int32), intent="NIFTI_INTENT_TRIANGLE"
            ),
        ]
    )
    nib.save(img, path)
    return Path(path)


def save_vertex_values(values: np.ndarray, path: str | Path) -> Path:
    """Per-vertex values as a GIfTI functional file."""
    img = nib.gifti.GiftiImage(
        darrays=[
            nib.gifti.GiftiDataArray(np.asarray(values, np.float32), intent="NIFTI_INTENT_NONE")
        ]
    )
    nib.save(img, path)
    return Path(path)


# ----------------------------------------------------------------------------- warnings, report


def fov_cut_mm2(face_mask: np.ndarray, affine: np.ndarray) -> float:
    """Area (mm^2) of head tissue in the face compartments (1, 3) on the faces of the volume's
    box: the face goes on outside the field of view, where it can be neither defaced nor checked."""
    zooms = voxel_sizes(affine)
    tissue = np.isin(np.asarray(face_mask), (1, 3))
    area = 0.0
    for axis in range(3):
        pixel_mm2 = float(np.prod(np.delete(zooms, axis)))
        for end in (0, -1):
            area += np.count_nonzero(np.take(tissue, end, axis=axis)) * pixel_mm2
    return area


def qa_warnings(stats: dict, face_mask: np.ndarray, affine: np.ndarray) -> list[str]:
    """What a reader of the report should look at: a cut face, a doubtful registration, a face
    that still coincides with the defaced skin."""
    found = []
    cut = fov_cut_mm2(face_mask, affine)
    if cut > WARN_FOV_CUT_MM2:
        found.append(
            f"face cut by the field of view: {cut:.0f} mm² of face tissue lies on the edge of "
            "the volume; what is outside was neither defaced nor checked"
        )
    dice = stats.get("registration", {}).get("head_dice")
    if dice is not None and dice < WARN_HEAD_DICE:
        found.append(
            f"low registration quality: the head masks overlap with Dice {dice:.2f} "
            f"(< {WARN_HEAD_DICE}); check that the outlined face region covers the face"
        )
    check = stats.get("pics", {}).get("dist_to_face", {})
    if check.get("coincide_fraction", 0.0) > WARN_COINCIDE_FRACTION:
        found.append(
            f"{100 * check['coincide_fraction']:.1f} % of the face's skin still lies within "
            f"{COINCIDE_MM:g} mm of the defaced skin (> {100 * WARN_COINCIDE_FRACTION:g} %)"
        )
    return found


def versions() -> dict[str, str]:
    """Versions of this package, Python and the libraries that shape the result."""
    found = {"mideface-nipype": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _table(rows: list[tuple[str, object]]) -> str:
    def cell(value: object) -> str:
        text = f"{value:.6g}" if isinstance(value, float) else json.dumps(value)
        return html.escape(text.strip('"'))

    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{cell(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _data_uri(path: Path) -> str:
    mime = "image/gif" if path.suffix == ".gif" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1400px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; font-weight: normal; }
figure { margin: 0 0 1.2em 0; } figure img { max-width: 100%; background: #000; }
.warn { color: #a00; } .ok { color: #070; }
"""


def report_html(
    *,
    title: str,
    stats: dict,
    options: dict,
    warnings: list[str],
    pictures: list[str | Path] = (),
    methods: str = "",
) -> str:
    """The QA report as one HTML page; pictures embedded, so it opens anywhere, offline.

    ``methods`` (``reports.methods.methods_text``) is shown under "Methods", ready to cite.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mideface QA: {html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>mideface QA: {html.escape(title)}</h1>",
        f"<p>mideface-nipype {html.escape(__version__)}, "
        f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>",
        "<h2>Warnings</h2>",
    ]
    if warnings:
        parts.append(
            "<ul>" + "".join(f'<li class="warn">{html.escape(w)}</li>' for w in warnings) + "</ul>"
        )
    else:
        parts.append('<p class="ok">none</p>')
    check = stats.get("pics", {}).get("dist_to_face")
    if check:
        parts += ["<h2>Dist-to-face check</h2>", _table(list(check.items()))]
    if pictures:
        parts.append("<h2>Pictures</h2>")
        for path in map(Path, pictures):
            caption = PICTURES.get(path.name, path.name)
            parts.append(
                f'<figure><img src="{_data_uri(path)}" alt="{html.escape(path.name)}">'
                f"<figcaption>{html.escape(path.name)}: {html.escape(caption)}</figcaption>"
                "</figure>"
            )
    else:
        parts.append("<p>No pictures (run with <code>--pics</code>).</p>")
    if methods:
        paragraph, _, references = methods.partition("\nReferences\n")
        cited = "".join(
            f"<li>{html.escape(line.removeprefix('- '))}</li>" for line in references.splitlines()
        )
        parts += [
            "<h2>Methods</h2>",
            f'<p id="methods">{html.escape(paragraph.strip())}</p>',
            f"<h3>References</h3><ul>{cited}</ul>",
        ]
    timings = [
        (k, v["seconds"]) for k, v in stats.items() if isinstance(v, dict) and "seconds" in v
    ]
    timings.append(("total", stats.get("seconds_total")))
    parts += ["<h2>Timings (s)</h2>", _table(timings)]
    parts += ["<h2>Options</h2>", _table(sorted(options.items()))]
    parts += ["<h2>Versions</h2>", _table(list(versions().items()))]
    sections = {k: v for k, v in stats.items() if isinstance(v, dict | list)}
    parts.append("<h2>Statistics (stats.json)</h2>")
    for name, section in sections.items():
        items = section if isinstance(section, list) else [section]
        for item in items:
            parts += [f"<h3>{html.escape(name)}</h3>", _table(_flatten(item))]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(path: str | Path, **kwargs) -> Path:
    """Write :func:`report_html` atomically."""
    return io.write_text_atomic(report_html(**kwargs), path)


# ----------------------------------------------------------------------------- provenance


def sidecar_path(image: str | Path) -> Path:
    """``.../sub-01_T1w.nii.gz`` -> ``.../sub-01_T1w.json``."""
    return Path(io.derived_name_parts(str(image))[0] + ".json")


def sidecar_text(
    defaced_path: str | Path,
    *,
    options: dict,
    face_mask_path: str | Path | None = None,
    source_path: str | Path | None = None,
) -> str:
    """The JSON sidecar of a defaced image (for ``sidecar_path(defaced_path)``).

    It keeps the acquisition metadata of the source image's own sidecar (``source_path``'s
    ``.json``, if there is one) and of a sidecar already at the target, and adds
    ``Description`` and a ``Defacing`` record: tool, version, options, face-mask file (relative
    to the sidecar's folder when it is beneath it) and source image.
    """
    target = sidecar_path(defaced_path)
    meta: dict = {}
    for existing in (sidecar_path(source_path) if source_path else None, target):
        if existing is not None and existing.is_file():
            try:
                meta.update(json.loads(existing.read_text()))
            except ValueError as err:
                raise io.InputError(f"{existing}: unreadable JSON sidecar ({err})") from err
    record: dict = {"Tool": "mideface-nipype", "Version": __version__, "Options": options}
    if face_mask_path is not None:
        mask = Path(face_mask_path).resolve()
        folder = target.parent.resolve()
        record["FaceMask"] = str(mask.relative_to(folder) if mask.is_relative_to(folder) else mask)
    if source_path is not None:
        record["Source"] = str(Path(source_path).resolve())
    return sidecar_json(defaced_sidecar(meta, Defacing=record))


def defaced_sidecar(meta: dict, *, description: str = DEFACED_DESCRIPTION, **fields) -> dict:
    """The one schema of a defaced image's sidecar: the source's metadata ``meta`` (acquisition
    fields kept), then ``Description``, then ``fields`` (``--odir``: the ``Defacing`` record;
    BIDS: ``DefaceSeed``, ``Sources``, ``SkullStripped``, ``SpatialReference``)."""
    return meta | {"Description": description} | fields


def sidecar_json(meta: dict) -> str:
    """A sidecar's text: indented JSON, one trailing newline."""
    return json.dumps(meta, indent=2, default=str) + "\n"


def collect_stats(records: dict[str, dict | list[dict]]) -> dict:
    """``stats.json`` from the step records by section name: the package version, the sections
    in ``STATS_SECTIONS`` order (those absent from ``records`` left out) and the seconds total."""
    unknown = set(records) - set(STATS_SECTIONS)
    if unknown:
        raise ValueError(f"unknown stats.json sections {sorted(unknown)}")
    merged: dict = {"mideface_nipype_version": __version__}
    total = 0.0
    for section in STATS_SECTIONS:
        if section in records:
            merged[section] = records[section]
            items = records[section] if section in PER_IMAGE_SECTIONS else [records[section]]
            for item in items:  # one by one, in file order: the same float total as ever
                total += float(item.get("seconds", 0.0))
    merged["seconds_total"] = round(total, 3)
    return merged
