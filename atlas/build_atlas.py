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
5. Labels: each vertex gets at most one region from the rules in ``label_vertices``, built from
   face landmarks in MNI mm read off the average head and written down below (brow ridge,
   nasion, nose base, mouth line, eyelids, pre-auricular skin, jaw line, menton). The face
   (``face_domain``) is the outer skin below the brow ridge (dropping at the temples), in front
   of the ears and above the jaw line and the chin's underside, where outward rays stay out of
   the head (``rays_escape``); within it: eyes with their lids (ellipsoids), the nose (a band
   widening from the nasion to the alae), the lower face (below the mouth line: lips, chin, jaw,
   the chin's underside) and the upper face (the rest: cheeks, orbital rims, brows). Ears,
   forehead and back of head as before. Only outer skin (seen from outside, facing away from the
   head centre) is labelled. The peers' face regions (pydeface, caideface, AFNI refacer) are
   sampled on the surface and the share of their skin below the brow that the default labels
   cover goes into ``atlas.json`` (``peer_coverage``).
6. Watermark: the word MIDEFACE in a 5x7 pixel font, projected from the front onto the lower face.
7. QA renders of the labelled surface in ``qa/``, and of each peer's face region beside ours.
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

from mideface_nipype.engine import atlas as atlas_mod  # noqa: E402
from mideface_nipype.engine import register  # noqa: E402
from mideface_nipype.utils import geometry  # noqa: E402

HERE = Path(__file__).resolve().parent

#: The atlas box in MNI mm (RAS): the whole head with the face and the whole chin. The average
#: head's chin front runs down to z -140, where it turns under, and its signal fades below z
#: -136 (its subjects' fields of view end there); a floor at -130 cut the chin off, and
#: subjects' chins (the jaw relaxed, the mouth a little open) land at z -135 to -146 after the
#: atlas registration.
BOX_MIN_MM = np.array([-100.0, -140.0, -150.0])
BOX_MAX_MM = np.array([100.0, 124.0, 110.0])
BUILD_MM = 1.0
#: ANTs pyramid of the build's one registration (MNI -> pydeface average head, 2 mm), given
#: explicitly: the build has no refining run, and the committed atlas was made with this pyramid,
#: so a change of the engine's ``ATLAS_PYRAMID`` leaves the atlas reproducible.
MNI_PYRAMID = ((200, 200, 100), (4, 2, 1), (2, 1, 0))
SURFACE_MM = 1.5
HEAD_THRESHOLD = 80.0
CLOSING_VOX = 3
VISIBLE_TOL_MM = 4.0
#: Landmarks of the face (MNI mm), read off the average head's skin (its midline profile and
#: coronal outlines); the labels are built from them.
#: Brow ridge (glabella, midline): the face labels end at this height (z), the forehead starts.
#: Lateral to the brows (|x| from ``BROW_LATERAL_MM[0]`` to ``[1]``) the edge drops to
#: ``BROW_LATERAL_MM[2]``: the temples (temporal fossa, the brain behind a thin wall) are left
#: out; the cheeks below them reach back to the ear.
BROW_Z_MM = -22.0
BROW_LATERAL_MM = (45.0, 70.0, -32.0)
#: Nasion (0, 85, -50) and the nose's base beside the alae (z -84): the nose band is 8 mm
#: wide each side of the midline at the nasion, 18 mm at its base, in front of y = 76.
NOSE_HALF_WIDTH_MM = ((-48.0, 8.0), (-84.0, 18.0))
NOSE_MIN_Y_MM = 76.0
#: Mouth line (z): below the nose's base the lower face (lips, chin, jaw) starts.
MOUTH_LINE_Z_MM = -84.0
#: Eyes with their lids and canthi: the eyelid surface's centre (+-31, 72, -50) (the orbit's
#: hollow on the average head, y 69-73 between z -62 and -40) and the ellipsoid's radii: inner
#: canthus x 16, outer canthus x 46, lids from z -61 (lower) to -39 (upper, below the brow).
EYELID_CENTRE_MM = (31.0, 72.0, -50.0)
EYELID_RADII_MM = (15.0, 14.0, 11.0)
#: Pre-auricular skin: the cheeks reach back to this coronal plane, behind the ear label's front
#: edge (y = -14), so that no unlabelled strip is left between cheek and ear.
PREAURICULAR_Y_MM = -16.0
#: Lower edge of the face: from below the ear (y, z) = (-10, -118) along the jaw line and the
#: chin's underside to the chin's front at (y, z) = (60, -141) (the average head's chin front
#: stands at y 67 from the menton's height here down to z -140, where it turns under; the line
#: ending at (50, -136) left its lowest 5 mm out, and with them the chins that the registration
#: puts at z -143 to -146). Below the menton's height only skin that does not face backwards (normal
#: y > ``UNDER_CHIN_MIN_NORMAL_Y``); nowhere skin facing straight down (normal z <=
#: ``UNDER_CHIN_MIN_NORMAL_Z``: from the hollows under the jaw a ray runs down the subject's
#: neck); and only where the outward rays stay out of the head (``rays_escape``).
JAW_BACK_MM = (-10.0, -118.0)
JAW_FRONT_MM = (60.0, -141.0)
MENTON_Z_MM = -130.0
UNDER_CHIN_MIN_NORMAL_Y = -0.1
UNDER_CHIN_MIN_NORMAL_Z = -0.85
#: Below this height the average head's signal fades (its subjects' fields of view end) and its
#: skin bends into the floor that closes it (normals down the neck): only the chin's front
#: reaches below it (to the jaw line's end), and it is left out of the comparison with the
#: peers.
NECK_CUT_Z_MM = -136.0
#: The front of the neck (MNI y): below the neck's cut, the head is continued by the cut's
#: slice behind this plane only (the throat), not by the chin above it.
THROAT_Y_MM = 30.0
#: Outward rays are checked from this depth to this length (mm) in the average head's mask.
RAY_START_MM = 3.0
RAY_CHECK_MM = 60.0
#: The labels defaced by default (``bracket.select_labels()``), compared with the peers.
DEFAULT_FACE_LABELS = ("lower-face", "upper-face", "nose", "eyes", "ear-left", "ear-right")
#: The peers' face regions (file in the atlas sources, and which value marks the face):
#: pydeface's face mask (pydeface_mean space), caideface's face mask and AFNI refacer's shells
#: (MNI 2009 space; shell 212 is the face, 211 the whole head).
PEER_FACE_REGIONS = {
    "pydeface": ("pydeface_facemask.nii.gz", "zero"),
    "caideface": ("caideface_t1_facemask_mni55ext.nii.gz", "zero"),
    "afni-refacer-face": ("niivue-deface_refacer_shell_sym212.nii.gz", "positive"),
    "afni-refacer-head": ("niivue-deface_refacer_shell_sym211.nii.gz", "positive"),
}
#: Depth (mm) under the skin down to which the peers' regions are sampled.
PEER_DEPTH_MM = 6.0
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


def average_head_in_mni(sources: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 1: the pydeface average head, affinely registered to MNI, on the 1 mm box (and the
    MNI -> average head affine)."""
    ssw, ssw_aff = load(sources / "niivue-deface_MNI152_2009_SSW.nii.gz")
    avg, avg_aff = load(sources / "pydeface_mean_reg2mean.nii.gz")
    f2, f2_aff = geometry.smooth_downsample(ssw, ssw_aff, 2.0)
    m2, m2_aff = geometry.smooth_downsample(avg, avg_aff, 2.0)
    init = np.eye(4)
    init[:3, 3] = geometry.centroid_mm(m2 > m2.mean(), m2_aff) - geometry.centroid_mm(
        f2 > f2.mean(), f2_aff
    )
    mni_to_avg = register.register_affine(f2, f2_aff, m2, m2_aff, initial=init, pyramid=MNI_PYRAMID)
    shape, affine = box_grid(BUILD_MM)
    head = geometry.resample(avg, avg_aff, shape, affine, target_to_source=mni_to_avg)
    return head, affine, mni_to_avg


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
        return geometry.resample(data, aff, shape, affine)

    gm = np.clip(icbm("gm") / 255.0, 0, 1)
    wm = np.clip(icbm("wm") / 255.0, 0, 1)
    brain = ndi.binary_fill_holes(icbm("t1") > 0.5)
    csf = np.clip(brain - gm - wm, 0, 1)
    xyz = world_coords(shape, affine)
    eyes = np.zeros(shape, dtype=bool)
    for centre in EYE_CENTRES_MM:
        eyes |= np.linalg.norm(xyz - np.asarray(centre), axis=-1) <= EYE_RADIUS_MM
    wm_intensity = np.median(head[wm > 0.9])
    dist_to_brain = ndi.distance_transform_edt(~brain, sampling=geometry.voxel_sizes(affine))
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
    soft15 = geometry.resample(soft, affine, shape15, aff15)
    padded = np.pad(soft15, 2)
    verts, faces, _, _ = marching_cubes(padded, level=0.5)
    verts = geometry.apply_affine(aff15, verts - 2)
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


def rays_escape(
    vertices: np.ndarray, normals: np.ndarray, mask: np.ndarray, affine: np.ndarray
) -> np.ndarray:
    """Vertices whose outward normal ray (``RAY_START_MM`` to ``RAY_CHECK_MM``) stays in air.

    A face vertex whose ray runs back into the head (the chin's underside near the neck, a
    fold) would set its label's outward distance to the thickness of the neck. The neck goes on
    below the average head's fading floor in a subject: below ``NECK_CUT_Z_MM`` the cut's slice
    behind ``THROAT_Y_MM`` stands for it.
    """
    depths_mm = np.arange(RAY_START_MM, RAY_CHECK_MM + 1e-9, BUILD_MM)
    points = vertices[:, None, :] + depths_mm[None, :, None] * normals[:, None, :]
    points = points.reshape(-1, 3)
    below = points[:, 2] < NECK_CUT_Z_MM
    points[below, 2] = NECK_CUT_Z_MM
    ijk = np.rint(geometry.apply_affine(np.linalg.inv(affine), points)).astype(np.intp)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(mask.shape)), axis=1)
    inside &= ~below | (points[:, 1] <= THROAT_Y_MM)
    hit = np.zeros(len(ijk), dtype=bool)
    hit[inside] = mask[tuple(ijk[inside].T)]
    return ~hit.reshape(len(vertices), -1).any(axis=1)


def outer_skin(vertices: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Skin seen from outside: facing away from the head centre and outermost from the front,
    a side or below (not the inside of a fold or pocket)."""
    outer = np.einsum("ij,ij->i", vertices - HEAD_CENTRE_MM, normals) > 0
    seen = (
        visible(vertices, 1, 1.0)
        | visible(vertices, 0, 1.0)
        | visible(vertices, 0, -1.0)
        | visible(vertices, 2, -1.0)
    )
    return outer & seen


def jaw_line_z_mm(y_mm: np.ndarray) -> np.ndarray:
    """Height (MNI z) of the face's lower edge: the jaw line, then the chin's underside."""
    (y0, z0), (y1, z1) = JAW_BACK_MM, JAW_FRONT_MM
    t = np.clip((y_mm - y0) / (y1 - y0), 0.0, 1.0)
    return z0 + t * (z1 - z0)


def brow_line_z_mm(x_mm: np.ndarray) -> np.ndarray:
    """Height (MNI z) of the face's upper edge: the brow ridge, dropping at the temples."""
    x0, x1, z1 = BROW_LATERAL_MM
    t = np.clip((np.abs(x_mm) - x0) / (x1 - x0), 0.0, 1.0)
    return BROW_Z_MM + t * (z1 - BROW_Z_MM)


def face_domain(
    vertices: np.ndarray, normals: np.ndarray, skin: np.ndarray, escape: np.ndarray
) -> np.ndarray:
    """The whole face below the brow ridge, back to the pre-auricular skin, down to the jaw
    line, and the chin's underside where its rays stay out of the neck."""
    x, y, z = vertices.T
    not_backwards = (z >= MENTON_Z_MM) | (normals[:, 1] > UNDER_CHIN_MIN_NORMAL_Y)
    not_down = normals[:, 2] > UNDER_CHIN_MIN_NORMAL_Z
    return (
        skin
        & escape
        & (y >= PREAURICULAR_Y_MM)
        & (z < brow_line_z_mm(x))
        & (z >= jaw_line_z_mm(y))
        & not_backwards
        & not_down
    )


def nose_region(vertices: np.ndarray) -> np.ndarray:
    """The nose from the nasion to the alae: a band about the midline, widening downwards."""
    x, y, z = vertices.T
    (top_z, top_half), (bottom_z, bottom_half) = NOSE_HALF_WIDTH_MM
    t = np.clip((top_z - z) / (top_z - bottom_z), 0.0, 1.0)
    half_width = top_half + t * (bottom_half - top_half)
    return (np.abs(x) <= half_width) & (z <= top_z) & (z >= bottom_z) & (y >= NOSE_MIN_Y_MM)


def eye_region(vertices: np.ndarray) -> np.ndarray:
    """Eyes with their lids and canthi: an ellipsoid about each eye's surface centre."""
    x, y, z = vertices.T
    cx, cy, cz = EYELID_CENTRE_MM
    rx, ry, rz = EYELID_RADII_MM
    return ((np.abs(x) - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0


def label_vertices(vertices: np.ndarray, normals: np.ndarray, escape: np.ndarray) -> np.ndarray:
    """Step 5: per-vertex region index (0 = none), first matching rule wins.

    ``escape`` marks the vertices whose outward rays leave the head for good (``rays_escape``).
    """
    x, y, z = vertices.T
    ax = np.abs(x)
    skin = outer_skin(vertices, normals)
    face = face_domain(vertices, normals, skin, escape)
    side = skin & (visible(vertices, 0, 1.0) | visible(vertices, 0, -1.0))
    out = np.zeros(len(vertices), dtype=np.int16)
    idx = {name: i + 1 for i, name in enumerate(atlas_mod.LABELS)}

    def assign(name: str, sel: np.ndarray) -> None:
        out[(out == 0) & sel] = idx[name]

    assign("eyes", face & eye_region(vertices))
    assign("nose", face & nose_region(vertices))
    ear = (((y + 38.0) / 24.0) ** 2 + ((z + 48.0) / 34.0) ** 2 < 1.0) & (ax > 62.0) & side
    assign("ear-left", ear & (x < 0))
    assign("ear-right", ear & (x > 0))
    assign("lower-face", face & (z < MOUTH_LINE_Z_MM))
    assign("upper-face", face)
    front = skin & (normals[:, 1] > 0.2) & visible(vertices, 1, 1.0)
    assign("forehead", front & (z >= BROW_Z_MM) & (z < 40.0) & (ax < 55.0) & (y > 40.0))
    assign("back-of-head", (y < -70.0) & (z >= -90.0) & (z < 20.0) & skin)
    return out


def peer_regions(
    sources: Path, mni_to_avg: np.ndarray, vertices: np.ndarray, normals: np.ndarray
) -> dict[str, np.ndarray]:
    """Per vertex: inside the face region of each peer defacer anywhere from the skin to
    ``PEER_DEPTH_MM`` under it (AFNI's shells are a few mm thick and follow their own skin).

    pydeface's mask (0 = erase) lives on its average head, brought here by step 1's affine;
    caideface's mask (0 = erase) and AFNI refacer's shells (> 0 = replaced) are in MNI space.
    """
    depths_mm = np.arange(0.0, PEER_DEPTH_MM + 1e-9, BUILD_MM)
    points = (vertices[:, None, :] - depths_mm[None, :, None] * normals[:, None, :]).reshape(-1, 3)
    out = {}
    for name, (file, erase) in PEER_FACE_REGIONS.items():
        img = nib.load(sources / file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        world = geometry.apply_affine(mni_to_avg, points) if name == "pydeface" else points
        ijk = np.rint(geometry.apply_affine(np.linalg.inv(img.affine), world)).astype(np.intp)
        inside = np.all((ijk >= 0) & (ijk < np.asarray(data.shape)), axis=1)
        values = np.zeros(len(points), dtype=np.float32)
        values[inside] = data[tuple(ijk[inside].T)]
        face = inside & ((values == 0) if erase == "zero" else (values > 0))
        out[name] = face.reshape(len(vertices), -1).any(axis=1)
    return out


def peer_coverage(
    regions: np.ndarray, peers: dict[str, np.ndarray], skin: np.ndarray, z_mm: np.ndarray
) -> dict[str, float]:
    """Fraction of the outer skin below the brow (and above the neck's cut) that a peer defaces
    and our default labels (the face labels and the ears) cover."""
    default = [atlas_mod.LABELS.index(n) + 1 for n in DEFAULT_FACE_LABELS]
    ours = np.isin(regions, default)
    below = skin & (z_mm < BROW_Z_MM) & (z_mm >= NECK_CUT_Z_MM)
    return {
        name: round(
            float(np.count_nonzero(ours & theirs & below) / np.count_nonzero(theirs & below)), 4
        )
        for name, theirs in peers.items()
    }


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
    peers: dict[str, np.ndarray],
    qa_dir: Path,
) -> None:
    """Step 7: renders of the labelled surface, of each peer's face region beside our labels,
    and slices of the most likely tissue class."""
    from mideface_nipype.reports import render
    from mideface_nipype.reports.slices import save_png

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
        save_png(
            render.render_mesh(mesh.vertices, mesh.faces, view=view, vertex_colors=colours),
            qa_dir / f"labels-{view}.png",
        )
    # each peer's face region below the brow: green where our default labels cover it, red
    # where they do not; our labels elsewhere in blue
    ours = np.isin(regions, [atlas_mod.LABELS.index(n) + 1 for n in DEFAULT_FACE_LABELS])
    z = mesh.vertices[:, 2]
    below = outer_skin(mesh.vertices, mesh.vertex_normals) & (z < BROW_Z_MM) & (z >= NECK_CUT_Z_MM)
    for name, theirs in peers.items():
        colours = np.tile([200.0, 200.0, 200.0], (len(regions), 1))
        colours[ours] = [150, 150, 230]
        colours[theirs & below & ours] = [60, 190, 60]
        colours[theirs & below & ~ours] = [230, 40, 40]
        views = [
            render.render_mesh(mesh.vertices, mesh.faces, view=v, vertex_colors=colours)
            for v in ("front", "left", "three-quarter")
        ]
        height = max(v.shape[0] for v in views)
        save_png(
            np.concatenate(
                [np.pad(v, ((0, height - v.shape[0]), (0, 4), (0, 0))) for v in views], 1
            ),
            qa_dir / f"peer-{name}.png",
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
    save_png(np.repeat(np.repeat(tissue_colours[panel], 3, 0), 3, 1), qa_dir / "priors.png")


def build(sources: Path, out: Path, *, qa_renders: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    head1, aff1, mni_to_avg = average_head_in_mni(sources)
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
    normals = mesh.vertex_normals
    regions = label_vertices(
        mesh.vertices, normals, rays_escape(mesh.vertices, normals, mask1, aff1)
    )
    watermark = watermark_vertices(mesh.vertices, normals, regions)
    peers = peer_regions(sources, mni_to_avg, mesh.vertices, normals)
    coverage = peer_coverage(
        regions, peers, outer_skin(mesh.vertices, normals), mesh.vertices[:, 2]
    )
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
        "face_landmarks_mm": {
            "brow_z": BROW_Z_MM,
            "brow_lateral_x0_x1_z": BROW_LATERAL_MM,
            "nose_half_width_at_z": NOSE_HALF_WIDTH_MM,
            "nose_min_y": NOSE_MIN_Y_MM,
            "mouth_line_z": MOUTH_LINE_Z_MM,
            "eyelid_centre": EYELID_CENTRE_MM,
            "eyelid_radii": EYELID_RADII_MM,
            "preauricular_y": PREAURICULAR_Y_MM,
            "jaw_back_yz": JAW_BACK_MM,
            "jaw_front_yz": JAW_FRONT_MM,
            "menton_z": MENTON_Z_MM,
            "neck_cut_z": NECK_CUT_Z_MM,
        },
        "peer_coverage": {
            "what": "fraction of the atlas outer-skin vertices below the brow (z < "
            f"{BROW_Z_MM:g}) and above the neck's cut (z >= {NECK_CUT_Z_MM:g}) inside each peer's "
            f"face region (from the skin to {PEER_DEPTH_MM:g} mm under it) that the default labels "
            f"({', '.join(DEFAULT_FACE_LABELS)}) cover",
            **coverage,
        },
        "build": {
            "box_min_mm": BOX_MIN_MM.tolist(),
            "box_max_mm": BOX_MAX_MM.tolist(),
            "head_threshold": HEAD_THRESHOLD,
            "closing_vox": CLOSING_VOX,
            "visible_tol_mm": VISIBLE_TOL_MM,
            "ray_check_mm": [RAY_START_MM, RAY_CHECK_MM],
            "surface_mm": SURFACE_MM,
            "prior_smooth_mm": PRIOR_SMOOTH_MM,
            "bone_intensity_frac": BONE_INTENSITY_FRAC,
            "bone_max_dist_mm": BONE_MAX_DIST_MM,
        },
    }
    (out / atlas_mod.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if qa_renders:
        save_qa(mesh, regions, watermark, priors, peers, out / "qa")


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
