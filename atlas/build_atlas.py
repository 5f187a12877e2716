#!/usr/bin/env python
"""Build the mideface-nipype face atlas (MNI ICBM152 2009 space) from openly licensed sources.

    python atlas/build_atlas.py --sources ../shared/data/atlas-sources --out atlas

Steps (every number is written down here, so a rerun reproduces the committed files):

1. The pydeface average head (MIT) is registered to the MNI ICBM152 2009 "SSW" whole-head
   template with an ANTs affine at 2 mm (fixed seed, one thread) and resampled onto the atlas box.
2. Head mask: the average head smoothed by 1 mm and thresholded at ``HEAD_THRESHOLD``; that level
   sits above the goggle-shaped registration artefact of the pydeface average in front of the eyes
   (intensities 20-60) and below the skin (>150). Largest component, holes filled.
3. Tissue priors at 2 mm: grey and white matter from the ICBM 2009a probability maps; CSF = the
   ICBM brain mask minus GM and WM; eyes = two balls at ``EYE_CENTRES_MM`` (the dark vitreous of the
   average head); bone = the dark band of the average head between the brain and the skin; soft
   tissue = the rest of the head mask; air = outside the head. Each is smoothed by 1 mm and all are
   normalised to sum to 1.
4. Head surface: marching cubes of the smoothed head mask at 1.5 mm, Taubin-smoothed; watertight,
   outward normals, edges of 1-2 mm.
5. Labels: each vertex gets at most one region from the rules in ``label_vertices`` (boxes and
   ellipsoids in MNI mm around landmarks read off the average head: nasion (0, 85, -45), nose
   tip (0, 95, -72), lips (0, 96, -88), chin (0, 92, -100), eyes (+-33, 57, -45), ears
   (+-84, -38, -48)); only vertices on the outer skin (seen from outside, facing away from the
   head centre) are labelled.
6. Watermark: the word MIDEFACE in a 5x7 pixel font, projected from the front onto the lower face.
7. QA renders of the labelled surface in ``qa/``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import trimesh  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from skimage.measure import marching_cubes  # noqa: E402

from mideface_nipype import atlas as atlas_mod  # noqa: E402
from mideface_nipype import register  # noqa: E402

HERE = Path(__file__).resolve().parent

#: The atlas box in MNI mm (RAS): the whole head with the face, the neck cut at z = -130.
BOX_MIN_MM = np.array([-100.0, -140.0, -130.0])
BOX_MAX_MM = np.array([100.0, 124.0, 110.0])
BUILD_MM = 1.0
SURFACE_MM = 1.5
HEAD_THRESHOLD = 80.0
CLOSING_VOX = 3
VISIBLE_TOL_MM = 4.0
#: The chin's underside is labelled in front of this coronal plane (the front of the neck).
CHIN_MIN_Y_MM = 50.0
#: Centre of the head (MNI mm): a labelled vertex must face away from it (no pockets or folds).
HEAD_CENTRE_MM = np.array([0.0, -20.0, -30.0])
EYE_CENTRES_MM = ((33.0, 57.0, -45.0), (-33.0, 57.0, -45.0))
EYE_RADIUS_MM = 11.0
#: Bone: darker than this fraction of the white-matter intensity, within this distance of the brain.
BONE_INTENSITY_FRAC = 0.45
BONE_MAX_DIST_MM = 14.0
PRIOR_SMOOTH_MM = 1.0
RIPPLE = {"center_mm": HEAD_CENTRE_MM.tolist(), "amp_mm": 1.5, "period_mm": 30.0, "axis": "theta"}

FONT_5X7 = {
    "M": ["10001", "11011", "10101", "10101", "10001", "10001", "10001"],
    "I": ["11111", "00100", "00100", "00100", "00100", "00100", "11111"],
    "D": ["11110", "10001", "10001", "10001", "10001", "10001", "11110"],
    "E": ["11111", "10000", "10000", "11110", "10000", "10000", "11111"],
    "F": ["11111", "10000", "10000", "11110", "10000", "10000", "10000"],
    "A": ["01110", "10001", "10001", "11111", "10001", "10001", "10001"],
    "C": ["01111", "10000", "10000", "10000", "10000", "10000", "01111"],
}
WATERMARK_TEXT = "MIDEFACE"
#: Text box (MNI mm) seen from the front: x from -45 to 45, z from -105 to -91.
WATERMARK_X_MM = (-45.0, 45.0)
WATERMARK_Z_MM = (-105.0, -91.0)


def box_grid(spacing_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    shape = tuple(int(n) for n in np.round((BOX_MAX_MM - BOX_MIN_MM) / spacing_mm).astype(int) + 1)
    affine = np.diag([spacing_mm] * 3 + [1.0])
    affine[:3, 3] = BOX_MIN_MM
    return shape, affine


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def average_head_in_mni(sources: Path) -> tuple[np.ndarray, np.ndarray]:
    """Step 1: the pydeface average head, affinely registered to MNI, on the 1 mm box."""
    ssw, ssw_aff = load(sources / "niivue-deface_MNI152_2009_SSW.nii.gz")
    avg, avg_aff = load(sources / "pydeface_mean_reg2mean.nii.gz")
    f2, f2_aff = register.smooth_downsample(ssw, ssw_aff, 2.0)
    m2, m2_aff = register.smooth_downsample(avg, avg_aff, 2.0)
    init = np.eye(4)
    init[:3, 3] = register._centroid(m2 > m2.mean(), m2_aff) - register._centroid(
        f2 > f2.mean(), f2_aff
    )
    mni_to_avg = register.register_affine(f2, f2_aff, m2, m2_aff, initial=init)
    shape, affine = box_grid(BUILD_MM)
    head = register.resample(avg, avg_aff, shape, affine, target_to_source=mni_to_avg)
    return head, affine


def head_mask(head: np.ndarray) -> np.ndarray:
    """Step 2 (see module docstring)."""
    mask = ndi.gaussian_filter(head, 1.0) > HEAD_THRESHOLD
    lab, _ = ndi.label(mask)
    mask = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
    # closing seals the narrow gaps (under the jaw, behind the ears) that become tunnels in the
    # surface; a tunnel's inner wall faces sideways and would be taken for face
    ball = ndi.generate_binary_structure(3, 1)
    mask = ndi.binary_closing(np.pad(mask, CLOSING_VOX), ball, CLOSING_VOX)
    mask = mask[(slice(CLOSING_VOX, -CLOSING_VOX),) * 3]
    return ndi.binary_fill_holes(mask)


def world_coords(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    return (
        np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) @ affine[:3, :3].T
        + affine[:3, 3]
    )


def tissue_priors(
    sources: Path, head: np.ndarray, mask: np.ndarray, affine: np.ndarray
) -> dict[str, np.ndarray]:
    """Step 3, on the 1 mm box; returns unnormalised class maps."""
    shape = head.shape

    def icbm(name: str) -> np.ndarray:
        data, aff = load(sources / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
        return register.resample(data, aff, shape, affine)

    gm = np.clip(icbm("gm") / 255.0, 0, 1)
    wm = np.clip(icbm("wm") / 255.0, 0, 1)
    brain = ndi.binary_fill_holes(icbm("t1") > 0.5)
    csf = np.clip(brain - gm - wm, 0, 1)
    xyz = world_coords(shape, affine)
    eyes = np.zeros(shape, dtype=bool)
    for centre in EYE_CENTRES_MM:
        eyes |= np.linalg.norm(xyz - np.asarray(centre), axis=-1) <= EYE_RADIUS_MM
    wm_intensity = np.median(head[wm > 0.9])
    dist_to_brain = ndi.distance_transform_edt(~brain, sampling=register.voxel_sizes(affine))
    bone = (
        mask
        & ~brain
        & ~eyes
        & (dist_to_brain <= BONE_MAX_DIST_MM)
        & (head < BONE_INTENSITY_FRAC * wm_intensity)
    )
    brain_or = brain | eyes | bone
    soft = mask & ~brain_or
    air = ~mask
    return {
        "air": air.astype(np.float32),
        "soft": soft.astype(np.float32),
        "bone": bone.astype(np.float32),
        "csf": csf * brain,
        "gm": gm * brain,
        "wm": wm * brain,
        "eyes": eyes.astype(np.float32),
    }


def downsample_priors(priors: dict[str, np.ndarray]) -> np.ndarray:
    """Smooth, take every other 1 mm sample (the 2 mm grid shares the box corner), normalise."""
    step = int(round(atlas_mod.PRIOR_MM / BUILD_MM))
    stack = np.stack(
        [
            ndi.gaussian_filter(priors[c], PRIOR_SMOOTH_MM / BUILD_MM)[::step, ::step, ::step]
            for c in atlas_mod.CLASSES
        ],
        axis=-1,
    )
    stack = np.clip(stack, 0, None)
    stack /= stack.sum(-1, keepdims=True)
    stack = np.round(stack, 4)
    # put the rounding residue on the largest class so that every voxel sums to 1 exactly
    largest = np.argmax(stack, axis=-1)[..., None]
    residue = 1.0 - stack.sum(-1, keepdims=True)
    np.put_along_axis(stack, largest, np.take_along_axis(stack, largest, -1) + residue, -1)
    return stack.astype(np.float32)


def head_surface(mask: np.ndarray, affine: np.ndarray) -> trimesh.Trimesh:
    """Step 4."""
    soft = ndi.gaussian_filter(mask.astype(np.float32), 1.0)
    shape15, aff15 = box_grid(SURFACE_MM)
    soft15 = register.resample(soft, affine, shape15, aff15)
    padded = np.pad(soft15, 2)
    verts, faces, _, _ = marching_cubes(padded, level=0.5)
    verts = register.apply_affine(aff15, verts - 2)
    # no vertex merging: marching cubes output is already shared-vertex and watertight
    mesh = trimesh.Trimesh(verts, faces, process=False)
    trimesh.smoothing.filter_taubin(mesh, lamb=0.5, nu=-0.53, iterations=10)
    trimesh.repair.fix_normals(mesh)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def visible(vertices: np.ndarray, axis: int, sign: float, bin_mm: float = 2.0) -> np.ndarray:
    """Vertices within ``VISIBLE_TOL_MM`` of the outermost surface seen along +-``axis``.

    Pockets and folds (under the jaw, behind the ears) lie behind the outer skin and are
    excluded: their outward normals point into the head, not away from it.
    """
    others = [i for i in range(3) if i != axis]
    keys = np.floor(vertices[:, others] / bin_mm).astype(int)
    _, bins = np.unique(keys, axis=0, return_inverse=True)
    height = sign * vertices[:, axis]
    top = np.full(bins.max() + 1, -np.inf)
    np.maximum.at(top, bins, height)
    return height >= top[bins] - VISIBLE_TOL_MM


def label_vertices(vertices: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Step 5: per-vertex region index (0 = none), first matching rule wins."""
    x, y, z = vertices.T
    ax = np.abs(x)
    outer = np.einsum("ij,ij->i", vertices - HEAD_CENTRE_MM, normals) > 0
    front = (normals[:, 1] > 0.2) & (y > 20) & outer & visible(vertices, 1, 1.0)
    side = outer & (visible(vertices, 0, 1.0) | visible(vertices, 0, -1.0))
    out = np.zeros(len(vertices), dtype=np.int16)
    idx = {name: i + 1 for i, name in enumerate(atlas_mod.LABELS)}

    def assign(name: str, sel: np.ndarray) -> None:
        out[(out == 0) & sel] = idx[name]

    eye_surface = np.linalg.norm(
        np.stack([ax - 33.0, y - 70.0, z + 45.0], -1), axis=-1
    )  # point on the eyelids in front of each eyeball
    assign("eyes", front & (eye_surface < 17.0))
    assign("nose", front & (ax <= 16.0) & (z >= -82.0) & (z <= -42.0) & (y > 74.0))
    ear = (((y + 38.0) / 24.0) ** 2 + ((z + 48.0) / 34.0) ** 2 < 1.0) & (ax > 62.0) & side
    assign("ear-left", ear & (x < 0))
    assign("ear-right", ear & (x > 0))
    # the chin's lower curve too, where it still faces forward: outward normals there run down
    # and forward into air. Not the underside: its normals run back into the neck, and one such
    # vertex sets the label's outward distance (its maximum) to the length of the neck
    under_chin = (
        outer
        & visible(vertices, 2, -1.0)
        & (normals[:, 1] > 0.0)
        & (normals[:, 2] < -0.3)
        & (y > CHIN_MIN_Y_MM)
    )
    assign("lower-face", (front | under_chin) & (z < -82.0) & (z >= -140.0) & (ax < 55.0))
    assign("upper-face", front & (z >= -82.0) & (z < -25.0) & (ax < 62.0) & (y > 30.0))
    assign("forehead", front & (z >= -25.0) & (z < 40.0) & (ax < 55.0) & (y > 40.0))
    assign("back-of-head", (y < -70.0) & (z >= -90.0) & (z < 20.0) & outer)
    return out


def watermark_vertices(
    vertices: np.ndarray, normals: np.ndarray, regions: np.ndarray
) -> np.ndarray:
    """Step 6: vertices under the lit pixels of MIDEFACE, seen from the front, on face labels."""
    glyphs = [np.array([[c == "1" for c in row] for row in FONT_5X7[ch]]) for ch in WATERMARK_TEXT]
    gap = np.zeros((7, 1), dtype=bool)
    bitmap = np.concatenate([g for ch in glyphs for g in (ch, gap)][:-1], axis=1)  # 7 x 47
    rows, cols = bitmap.shape
    x, _, z = vertices.T
    # seen from the front the subject's left (-x) is on the viewer's right
    col = np.floor((WATERMARK_X_MM[1] - x) / (WATERMARK_X_MM[1] - WATERMARK_X_MM[0]) * cols)
    row = np.floor((WATERMARK_Z_MM[1] - z) / (WATERMARK_Z_MM[1] - WATERMARK_Z_MM[0]) * rows)
    inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows) & (normals[:, 1] > 0.3)
    face_ids = [atlas_mod.LABELS.index(n) + 1 for n in ("lower-face", "upper-face", "nose")]
    inside &= np.isin(regions, face_ids)
    lit = np.zeros(len(vertices), dtype=bool)
    lit[inside] = bitmap[row[inside].astype(int), col[inside].astype(int)]
    return np.flatnonzero(lit)


def save_qa(
    mesh: trimesh.Trimesh,
    regions: np.ndarray,
    watermark: np.ndarray,
    priors: np.ndarray,
    qa_dir: Path,
) -> None:
    """Step 7: renders of the labelled surface and slices of the most likely tissue class."""
    from mideface_nipype import qa, render

    palette = np.array(
        [
            [200, 200, 200],
            [230, 80, 60],
            [250, 200, 40],
            [60, 170, 230],
            [80, 200, 90],
            [170, 90, 210],
            [210, 110, 170],
            [240, 140, 40],
            [120, 120, 240],
        ],
        dtype=float,
    )
    colours = palette[regions]
    colours[watermark] = [20, 20, 20]
    qa_dir.mkdir(parents=True, exist_ok=True)
    for view in ("front", "left", "right", "three-quarter"):
        qa.save_png(
            render.render_mesh(mesh.vertices, mesh.faces, view=view, vertex_colors=colours),
            qa_dir / f"labels-{view}.png",
        )
    tissue_colours = np.array(
        [
            [0, 0, 0],
            [200, 150, 120],
            [245, 245, 245],
            [40, 90, 220],
            [130, 130, 130],
            [230, 230, 90],
            [220, 40, 40],
        ],
        dtype=np.uint8,
    )
    cls = np.argmax(priors, axis=-1)
    cx, cy, cz = (np.asarray(cls.shape) // 2) + np.array([0, 0, 0])
    eye_z = int(round((EYE_CENTRES_MM[0][2] - BOX_MIN_MM[2]) / atlas_mod.PRIOR_MM))
    eye_x = int(round((EYE_CENTRES_MM[0][0] - BOX_MIN_MM[0]) / atlas_mod.PRIOR_MM))
    slices = [cls[cx].T[::-1], cls[eye_x].T[::-1], cls[:, :, eye_z].T[::-1], cls[:, cy].T[::-1]]
    height = max(s.shape[0] for s in slices)
    panel = np.concatenate(
        [np.pad(s, ((0, height - s.shape[0]), (0, 2)), constant_values=0) for s in slices], axis=1
    )
    qa.save_png(np.repeat(np.repeat(tissue_colours[panel], 3, 0), 3, 1), qa_dir / "priors.png")


def build(sources: Path, out: Path, *, qa_renders: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    head1, aff1 = average_head_in_mni(sources)
    mask1 = head_mask(head1)
    priors = downsample_priors(tissue_priors(sources, head1, mask1, aff1))
    shape2, aff2 = box_grid(atlas_mod.PRIOR_MM)
    step = int(round(atlas_mod.PRIOR_MM / BUILD_MM))
    head2 = ndi.gaussian_filter(head1 * mask1, 0.85)[::step, ::step, ::step]
    head2 = np.clip(np.round(head2 / np.percentile(head2[head2 > 0], 99.5) * 255), 0, 255)
    nib.save(nib.Nifti1Image(head2.astype(np.uint8), aff2), out / atlas_mod.HEAD_FILE)
    nib.save(
        nib.Nifti1Image(mask1[::step, ::step, ::step].astype(np.uint8), aff2),
        out / atlas_mod.HEADMASK_FILE,
    )
    nib.save(nib.Nifti1Image(priors, aff2), out / atlas_mod.PRIORS_FILE)

    mesh = head_surface(mask1, aff1)
    regions = label_vertices(mesh.vertices, mesh.vertex_normals)
    watermark = watermark_vertices(mesh.vertices, mesh.vertex_normals, regions)
    atlas_mod.save_surface(out, mesh.vertices, mesh.faces, regions, watermark)
    meta = {
        "space": "MNI152 ICBM 2009 (via the MNI152_2009_SSW whole-head template)",
        "classes": list(atlas_mod.CLASSES),
        "labels": list(atlas_mod.LABELS),
        "ripple": RIPPLE,
        "eye_centres_mm": EYE_CENTRES_MM,
        "eye_radius_mm": EYE_RADIUS_MM,
        "watermark_text": WATERMARK_TEXT,
        "head_centre_mm": HEAD_CENTRE_MM.tolist(),
        "build": {
            "box_min_mm": BOX_MIN_MM.tolist(),
            "box_max_mm": BOX_MAX_MM.tolist(),
            "head_threshold": HEAD_THRESHOLD,
            "closing_vox": CLOSING_VOX,
            "visible_tol_mm": VISIBLE_TOL_MM,
            "chin_min_y_mm": CHIN_MIN_Y_MM,
            "surface_mm": SURFACE_MM,
            "prior_smooth_mm": PRIOR_SMOOTH_MM,
            "bone_intensity_frac": BONE_INTENSITY_FRAC,
            "bone_max_dist_mm": BONE_MAX_DIST_MM,
        },
    }
    (out / atlas_mod.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if qa_renders:
        save_qa(mesh, regions, watermark, priors, out / "qa")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sources", type=Path, required=True, help="../shared/data/atlas-sources")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: atlas/)")
    parser.add_argument("--no-qa", action="store_true", help="skip the QA renders")
    args = parser.parse_args()
    build(args.sources, args.out, qa_renders=not args.no_qa)


if __name__ == "__main__":
    main()
