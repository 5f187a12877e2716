"""How well a defacer works, measured on real heads: privacy, brain preservation, cost.

Privacy is attacked as in Schwarz et al. (2019, 2021): the skin surface of each head is rendered
as a 3-D face (``render``, lit from above like a portrait) and a face recogniser (dlib's 128-d
ResNet descriptor, with the HOG detector and 68-point landmarks that ``face_recognition_models``
ships) ranks every probe against a gallery of intact frontal renders of all subjects. A control
in the same run (intact heads seen from +-30 deg yaw) shows that the attack works. A
detector-free check compares frontal depth maps of the face region. Refacing attacks smooth the
defaced image before rendering.

Brain preservation is judged with a brain mask that does not come from the defacer (another
template, a deformable registration, another brain mask), with tissue volumes from N4 and ANTs
Atropos in that mask on the original and on the defaced image, and with the brain mask estimated
anew on the defaced image. Cost is wall time and peak memory of each defacer as a whole process.
Needs the ``eval`` extra (``dlib-bin``, ``face_recognition_models``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import nibabel as nib
import numpy as np
import trimesh
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from mideface_nipype.engine import bracket, headmask, register
from mideface_nipype.engine.atlas import load_atlas
from mideface_nipype.reports import render
from mideface_nipype.utils import io
from mideface_nipype.utils.geometry import (
    GridImage,
    apply_affine,
    resample,
    smooth_downsample,
    voxel_sizes,
)

#: Yaw (deg) of the gallery view (intact heads) and of the probe views.
GALLERY_YAW_DEG = 0.0
PROBE_YAWS_DEG = (0.0, 30.0, -30.0)
#: Intact probes of the control: turned views, never the gallery image itself.
CONTROL_YAWS_DEG = (30.0, -30.0)
#: Parts of a render an attacker may read alone: the head's own face labels (what a defacer
#: replaces) or the rest of the view (forehead, ears, head outline: what every defacer here
#: leaves); the other part is painted black in the probe and in the gallery alike.
RENDER_PARTS = ("face", "rest")
#: Elevation (deg) of the renders' light above the camera, as a portrait's key light.
LIGHT_ELEVATION_DEG = 30.0
#: Atlas surface labels that make up the face region of the depth-map comparison.
FACE_LABELS = bracket.FACE_LABEL_NAMES
#: The 3-D attacker: skin points kept per head (outside / inside the face labels), rigid ICP
#: iterations, the pixel of its frontal depth maps (mm), and the largest distance (mm) from a
#: skin point to the head's own face labels for it to count as face: a defacer may move the
#: face's skin (ours pushes the template 8 mm out, a zero-filling one cuts it 10-20 mm in), and
#: what it put there is what the attacker compares. 3 mm from the atlas's own labels kept a
#: median of 2,100 points of an intact face and 39 of a quickshear one (now 10,600 and 4,300).
ICP_POINTS = 4000
FACE_POINTS = 30000
ICP_ITERATIONS = 40
ICP_DEPTH_PIXEL_MM = 1.0
FACE_NEAR_MM = 10.0
#: Refacing attacks on the defaced image before rendering: median filter and Gaussian smoothing.
MEDIAN_MM = 3.0
SMOOTH_FWHM_MM = 4.0
#: HOG detector: upsampling of the render and the score above which a face counts as detected.
HOG_UPSAMPLE = 1
HOG_MIN_SCORE = 0.0
#: Grid of the independent brain mask's SyN registration (3 mm: a few seconds).
BRAIN_REG_MM = 3.0
#: N4 shrink factor before that SyN (its field is a 200 mm B-spline: 3 s, not 22 s at shrink 2).
BRAIN_N4_SHRINK = 4
#: Dilation (voxels of that grid) of the template's brain that the SyN metric sees: the brain
#: and its skull, not the face or neck, whose shape a defacer changes.
BRAIN_METRIC_DILATE_VOX = 3
#: antspyx transform (``type_of_transform``) of the independent brain mask: its affine stage, then
#: SyN, from the engine's affine.
BRAIN_MASK_TRANSFORM = "SyN"
#: antspyx transform of the eICV pair (the brain mask of the original and of its defaced image,
#: both from the original's engine affine): SyN alone, without the affine stage that antspyx's
#: "SyN" runs first. That stage, fitted to the brain and skull only, flips between basins: on
#: dcmqa the original's own mask was 1527, 1544 or 1628 mL from engine affines 0.4-0.9 mm apart
#: at the face, and its defaced image's 1496-1749 mL (the eICV -3 to +15 %); with SyN alone
#: 1533-1550 and 1520-1535 mL (-1.1 to -0.6 %). The brain-voxel checks keep
#: ``BRAIN_MASK_TRANSFORM``.
EICV_TRANSFORM = "SyNOnly"
#: Grid of the tissue segmentation (Atropos: 3 classes by k-means, MRF smoothing).
TISSUE_MM = 2.0
TISSUES = ("csf", "gm", "wm")
#: N4 before the segmentation: shrink factor and iterations per level (10 s, not 100 s, at 2 mm).
N4_SHRINK = 4
N4_ITERS = (50, 50, 50)
#: Whole-head template and brain mask of the independent brain mask (in the atlas sources).
SSW_FILE = "niivue-deface_MNI152_2009_SSW.nii.gz"
ICBM_BRAIN_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


# ---------------------------------------------------------------- alignment and renders


def atlas_affine(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    """The engine's subject -> atlas (MNI) RAS affine of a head (robust pose search, ANTs)."""
    data = io.first_frame(img)
    head = np.asarray(headmask.head_mask(img).dataobj) > 0
    affine, _ = register.register_atlas(GridImage(data, img.affine, head), load_atlas())
    return affine


def align_to_atlas(
    img: nib.spatialimages.SpatialImage, subject_to_atlas: np.ndarray | None = None
) -> np.ndarray:
    """Rigid subject -> atlas (MNI) RAS matrix, so that every face is seen from the same side.

    ``atlas_affine`` (made here unless given), reduced to its rotation (polar decomposition) and
    the translation that maps the head centre where the affine maps it: the attack must see each
    face with its own proportions (an affine scales every head towards the average). The
    original head's matrix serves its defaced versions too, which gives the attacker the best
    possible alignment.
    """
    if subject_to_atlas is None:
        subject_to_atlas = atlas_affine(img)
    head = np.asarray(headmask.head_mask(img).dataobj) > 0
    return rigid_part(subject_to_atlas, apply_affine(img.affine, np.argwhere(head)).mean(0))


def rigid_part(matrix: np.ndarray, centre_mm: np.ndarray) -> np.ndarray:
    """The rotation of a 4x4 affine (nearest orthogonal matrix) about ``centre_mm``."""
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    rot = u @ vt
    if np.linalg.det(rot) < 0:  # a reflection is no pose
        rot = u @ np.diag([1.0, 1.0, -1.0]) @ vt
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = apply_affine(matrix, centre_mm[None])[0] - rot @ centre_mm
    return out


def view_frame(yaw_deg: float) -> tuple[np.ndarray, render.Frame]:
    """Camera and frame of a view: the atlas box seen from ``yaw_deg`` (the same for all heads)."""
    atlas = load_atlas()
    shape = atlas.head.shape
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1)
    cam = render.camera(yaw_deg)
    return cam, render.Frame.around(apply_affine(atlas.head.affine, corners.T), cam)


def render_views(
    data: np.ndarray, affine: np.ndarray, to_atlas: np.ndarray, yaws_deg=PROBE_YAWS_DEG
) -> dict[float, render.Render]:
    """Skin renders of a head, aligned to the atlas, one per yaw, lit from above."""
    mesh = render.skin_mesh(data, affine)
    vertices = apply_affine(to_atlas, mesh.vertices)
    normals = trimesh.Trimesh(vertices, mesh.faces, process=False).vertex_normals
    out = {}
    for yaw in yaws_deg:
        cam, frame = view_frame(yaw)
        rend, pixel_normals = render.rasterise(
            vertices, mesh.faces, cam, frame, vertex_values=normals
        )
        out[yaw] = render.Render(lit_from_above(pixel_normals, cam), rend.depth)
    return out


def lit_from_above(normals: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Lambert shade of per-pixel normals (NaN: no surface), the light ``LIGHT_ELEVATION_DEG``
    above the camera.

    The QA renders' light on the camera axis flattens the relief of the brow, nose and cheeks
    that a recogniser trained on photographs reads; portraits are lit from above. Surfaces are
    two-sided, as in ``render.rasterise``; ambient light is the QA renders' ``render.AMBIENT``.
    """
    elevation = np.deg2rad(LIGHT_ELEVATION_DEG)
    light = np.cos(elevation) * cam[2] + np.sin(elevation) * cam[1]
    unit = normals / (np.linalg.norm(normals, axis=-1, keepdims=True) + 1e-12)
    unit = np.where((unit @ cam[2] < 0)[..., None], -unit, unit)  # the side facing the camera
    return render.AMBIENT + (1 - render.AMBIENT) * np.clip(unit @ light, 0.0, None)


@lru_cache(maxsize=8)
def face_region(yaw_deg: float) -> np.ndarray:
    """Pixels of a view covered by the atlas face (lower, upper face, nose, eyes)."""
    return _face_pixels(yaw_deg)


def _face_pixels(yaw_deg: float, atlas_to_view: np.ndarray | None = None) -> np.ndarray:
    """The atlas face labels rasterised in a view, moved first by ``atlas_to_view`` (atlas mm
    -> the mm of the view) when given."""
    atlas = load_atlas()
    in_face = atlas.in_labels(FACE_LABELS).astype(float)
    vertices = atlas.surface.vertices
    if atlas_to_view is not None:
        vertices = apply_affine(atlas_to_view, vertices)
    cam, frame = view_frame(yaw_deg)
    _, values = render.rasterise(vertices, atlas.surface.faces, cam, frame, vertex_values=in_face)
    return np.nan_to_num(values[..., 0]) > 0.5


def own_labels_to_view(subject_to_atlas: np.ndarray, to_atlas: np.ndarray) -> np.ndarray:
    """Atlas mm -> the mm of a head's rigid view (``to_atlas``) through the head's registration
    (``subject_to_atlas``): where the head's own face labels sit in its renders."""
    return to_atlas @ np.linalg.inv(subject_to_atlas)


def subject_face_region(
    subject_to_atlas: np.ndarray, to_atlas: np.ndarray, yaw_deg: float = GALLERY_YAW_DEG
) -> np.ndarray:
    """Pixels of a head's renders (at ``yaw_deg``) that its own face labels cover: the labels
    as its registration (``subject_to_atlas``) places them, seen in its rigid view
    (``to_atlas``).

    The renders keep each head's proportions, so the atlas's own face region misses part of a
    large face and, below a small one, takes in the neck that no defacer touches.
    """
    return _face_pixels(yaw_deg, own_labels_to_view(subject_to_atlas, to_atlas))


# ---------------------------------------------------------------- face recognition


@dataclass(frozen=True)
class Face:
    """A face descriptor (128-d) and whether the detector found the face (and with what score)."""

    descriptor: np.ndarray
    detected: bool
    score: float


@lru_cache(maxsize=1)
def dlib_models():
    """dlib's HOG detector, 68-landmark predictor and ResNet descriptor (no download)."""
    import dlib

    models = files("face_recognition_models") / "models"
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat")),
        dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat")),
    )


def _box(mask: np.ndarray):
    """dlib rectangle: the square around a mask's bounding box."""
    import dlib

    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    half = max(r1 - r0, c1 - c0) // 2
    rc, cc = (r0 + r1) // 2, (c0 + c1) // 2
    return dlib.rectangle(int(cc - half), int(rc - half), int(cc + half), int(rc + half))


def describe_face(picture: np.ndarray, fallback: np.ndarray) -> Face:
    """Descriptor of the best-scoring face in an RGB picture.

    When the detector finds nothing, the attacker still knows where the face is in an aligned
    render: the descriptor is taken in the box around ``fallback`` (the head's own face labels,
    ``subject_face_region``), so a defaced head cannot escape by merely fooling the detector.
    """
    detector, predictor, model = dlib_models()
    picture = np.ascontiguousarray(picture, dtype=np.uint8)
    boxes, scores, _ = detector.run(picture, HOG_UPSAMPLE, HOG_MIN_SCORE)
    if boxes:
        best = int(np.argmax(scores))
        box, detected, score = boxes[best], True, float(scores[best])
    else:
        box, detected, score = _box(fallback), False, float("nan")
    shape = predictor(picture, box)
    descriptor = np.asarray(model.compute_face_descriptor(picture, shape), dtype=np.float64)
    return Face(descriptor, detected, score)


def part_picture(picture: np.ndarray, face_region: np.ndarray, part: str) -> np.ndarray:
    """A render with everything but ``part`` (``RENDER_PARTS``) painted black: the attacker who
    reads only the replaced face, or only what the defacer left around it."""
    if part not in RENDER_PARTS:
        raise ValueError(f"part must be one of {RENDER_PARTS}, not {part!r}")
    out = np.array(picture, copy=True)
    out[~face_region if part == "face" else face_region] = 0
    return out


def rank_of_truth(distances: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """1-based rank of each probe's true identity among the gallery, by increasing distance.

    ``distances`` is (probes, gallery); ``truth[i]`` is the gallery column of probe i. Ties count
    against the attacker (an equally near impostor ranks ahead).
    """
    distances = np.asarray(distances, dtype=float)
    true_d = distances[np.arange(len(truth)), truth]
    return (distances < true_d[:, None]).sum(1) + (distances == true_d[:, None]).sum(1)


def descriptor_distances(probes: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Euclidean distances (probes, gallery) between descriptors (dlib's own measure)."""
    return np.linalg.norm(probes[:, None, :] - gallery[None, :, :], axis=2)


def hub_discounted(distances: np.ndarray) -> np.ndarray:
    """Distances (probes, gallery) less each gallery face's mean distance to all the probes.

    A released set of defaced heads lets an attacker see which gallery faces lie near every
    defaced face: an average-looking face ("hub") is nearest to most probes, its own among them,
    so raw rank-1 credits the hub's owner and misses the others. Discounting each gallery face's
    mean distance (as cross-domain similarity local scaling does with its neighbours) takes that
    out; it needs nothing but the probes themselves.
    """
    distances = np.asarray(distances, dtype=float)
    return distances - distances.mean(axis=0, keepdims=True)


def depth_correlation(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """Pearson correlation of two aligned depth maps over ``region`` where both see a surface."""
    both = region & np.isfinite(a) & np.isfinite(b)
    if both.sum() < 3:
        return float("nan")
    return float(np.corrcoef(a[both], b[both])[0, 1])


# ---------------------------------------------------------------- the 3-D attacker


def skin_points(
    data: np.ndarray,
    affine: np.ndarray,
    to_atlas: np.ndarray,
    subject_to_atlas: np.ndarray,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Skin points of a head in its rigid view (``to_atlas``): a sample outside its own face
    labels (what the 3-D attacker aligns) and the points of the face (what it compares), both
    (N, 3) mm.

    The labels are the atlas surface as the head's registration (``subject_to_atlas``) places
    it, seen in the view (``own_labels_to_view``, as for ``subject_face_region``): the atlas's
    own surface would make the face a defacer-dependent subset of a head of another size. A
    point is face when its nearest placed vertex is in a face label and within
    ``FACE_NEAR_MM``; the rest of the head (scalp, ears, neck) is left as the defacer left it.
    """
    atlas = load_atlas()
    mesh = render.skin_mesh(data, affine)
    points = apply_affine(to_atlas, mesh.vertices)
    in_face = atlas.in_labels(FACE_LABELS)
    placed = apply_affine(own_labels_to_view(subject_to_atlas, to_atlas), atlas.surface.vertices)
    dist_mm, nearest = cKDTree(placed).query(points)
    face = in_face[nearest] & (dist_mm <= FACE_NEAR_MM)
    rng = np.random.default_rng(seed)
    rest, face_pts = points[~face], points[face]
    rest = rest[rng.choice(len(rest), min(ICP_POINTS, len(rest)), replace=False)]
    face_pts = face_pts[rng.choice(len(face_pts), min(FACE_POINTS, len(face_pts)), replace=False)]
    return rest, face_pts


def rigid_icp(
    moving: np.ndarray, fixed: np.ndarray, iterations: int = ICP_ITERATIONS
) -> np.ndarray:
    """4x4 rigid matrix moving -> fixed by point-to-point ICP (closest points, Kabsch).

    The worst fifth of the pairs are left out of each fit, so that parts one head has and the
    other lacks (neck length, hair, field of view) do not pull the fit.
    """
    tree = cKDTree(fixed)
    total = np.eye(4)
    current = np.asarray(moving, dtype=float)
    for _ in range(iterations):
        dist, idx = tree.query(current)
        keep = dist <= np.percentile(dist, 80)
        src, dst = current[keep], fixed[idx[keep]]
        src_c, dst_c = src.mean(0), dst.mean(0)
        u, _, vt = np.linalg.svd((src - src_c).T @ (dst - dst_c))
        rot = (u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt).T
        step = np.eye(4)
        step[:3, :3], step[:3, 3] = rot, dst_c - rot @ src_c
        current = current @ rot.T + step[:3, 3]
        total = step @ total
    return total


def frontal_depth(points: np.ndarray, region: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Depth map of points seen from the front: the most anterior y in each (x, z) pixel of the
    grid ``region`` (pixel edges in x and z, mm), NaN where no point falls."""
    x_edges, z_edges = region
    ix = np.searchsorted(x_edges, points[:, 0]) - 1
    iz = np.searchsorted(z_edges, points[:, 2]) - 1
    ok = (ix >= 0) & (ix < len(x_edges) - 1) & (iz >= 0) & (iz < len(z_edges) - 1)
    depth = np.full((len(x_edges) - 1, len(z_edges) - 1), -np.inf)
    np.maximum.at(depth, (ix[ok], iz[ok]), points[ok, 1])
    return np.where(np.isfinite(depth), depth, np.nan)


def face_grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel edges (x, z in atlas mm) of the 3-D attacker's depth maps: the face labels' extent."""
    atlas = load_atlas()
    face = atlas.surface.vertices[atlas.in_labels(FACE_LABELS)]
    lo, hi = face.min(0), face.max(0)
    return (
        np.arange(lo[0], hi[0] + ICP_DEPTH_PIXEL_MM, ICP_DEPTH_PIXEL_MM),
        np.arange(lo[2], hi[2] + ICP_DEPTH_PIXEL_MM, ICP_DEPTH_PIXEL_MM),
    )


def icp_depth_correlations(
    probes: list[tuple[np.ndarray, np.ndarray]], gallery: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """(probes, gallery) Pearson r of face depth maps after aligning each probe to each gallery
    head by rigid ICP of the skin outside the face labels (``skin_points`` pairs)."""
    grid = face_grid()
    gallery_depth = [frontal_depth(face, grid) for _, face in gallery]
    out = np.full((len(probes), len(gallery)), np.nan)
    for i, (rest, face) in enumerate(probes):
        for j, (g_rest, _) in enumerate(gallery):
            matrix = rigid_icp(rest, g_rest)
            moved = apply_affine(matrix, face)
            both = np.ones(gallery_depth[j].shape, dtype=bool)
            out[i, j] = depth_correlation(frontal_depth(moved, grid), gallery_depth[j], both)
    return out


# ---------------------------------------------------------------- refacing attacks


def refacing_attacks(data: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
    """The defaced image after a median filter and after Gaussian smoothing (world-mm sizes).

    The noise fill must not hide a recoverable face: smoothing removes noise and leaves any
    surface that the fill kept.
    """
    zooms = voxel_sizes(affine)
    size = np.maximum(3, 2 * np.round(MEDIAN_MM / zooms / 2).astype(int) + 1)
    sigma_vox = SMOOTH_FWHM_MM / 2.355 / zooms
    data = np.asarray(data, dtype=np.float32)
    return {
        "median": ndi.median_filter(data, size=tuple(size)),
        "smooth": ndi.gaussian_filter(data, sigma_vox),
    }


# ---------------------------------------------------------------- brain preservation


def independent_brain_mask(
    img: nib.spatialimages.SpatialImage,
    sources_dir: str | Path,
    subject_to_atlas: np.ndarray | None = None,
    transform: str = BRAIN_MASK_TRANSFORM,
) -> np.ndarray:
    """Boolean brain mask on ``img``'s grid that does not come from the defacer's masks.

    The engine protects atlas priors and its own segmentation; this mask comes from another
    template (MNI152 2009 SSW, whole head), N4 bias correction, a deformable ANTs SyN
    registration and the ICBM 2009a brain, so a shared mistake is unlikely. SyN starts from
    ``subject_to_atlas`` (``atlas_affine`` of ``img`` unless given; the eICV passes the
    original's to its defaced image, so both start alike) and its metric sees only the
    template's brain and skull (``BRAIN_METRIC_DILATE_VOX``): from antspyx's own centre-of-mass
    start, with the whole head in the metric, it landed on the scalp on some heads (2 L masks)
    and jumped by up to 22 % when only N4's sampling changed. ``sources_dir`` holds ``SSW_FILE``
    and ``ICBM_BRAIN_FILE``; ``transform`` is antspyx's ``type_of_transform`` (``EICV_TRANSFORM``
    for the eICV pair).
    """
    if subject_to_atlas is None:
        subject_to_atlas = atlas_affine(img)
    ants = register.import_ants()
    sources_dir = Path(sources_dir)
    data = io.first_frame(img)
    fixed, fixed_aff = smooth_downsample(data, img.affine, BRAIN_REG_MM)
    ssw = nib.load(sources_dir / SSW_FILE)
    moving, moving_aff = smooth_downsample(
        np.asarray(ssw.dataobj, np.float32), ssw.affine, BRAIN_REG_MM
    )
    brain_src = nib.load(sources_dir / ICBM_BRAIN_FILE)
    brain = ndi.binary_fill_holes(np.asarray(brain_src.dataobj) > 0).astype(np.float32)
    # the brain mask lives on its own grid: put it on the SSW 3 mm grid first
    brain3 = resample(brain, brain_src.affine, moving.shape, moving_aff)
    metric_mask = ndi.binary_dilation(brain3 > 0.5, iterations=BRAIN_METRIC_DILATE_VOX)
    # N4 first: a strong bias field (dcmqa) otherwise lets SyN stretch the brain to the scalp
    fixed_img = ants.n4_bias_field_correction(
        register.to_ants(fixed, fixed_aff), shrink_factor=BRAIN_N4_SHRINK
    )
    with tempfile.TemporaryDirectory(prefix="mideface-brain-") as tmp:
        start = register.ras_to_ants_transform(subject_to_atlas, Path(tmp) / "start.mat")
        reg = ants.registration(
            fixed_img,
            register.to_ants(moving, moving_aff),
            type_of_transform=transform,
            initial_transform=[str(start)],
            moving_mask=register.to_ants(metric_mask.astype(np.float32), moving_aff),
            mask_all_stages=True,
            outprefix=str(Path(tmp) / "syn_"),
        )
        warped = ants.apply_transforms(
            fixed_img,
            register.to_ants(brain3, moving_aff),
            reg["fwdtransforms"],
            interpolator="linear",
        ).numpy()
    return resample(warped, fixed_aff, data.shape, img.affine) > 0.5


def voxels_changed(original: np.ndarray, defaced: np.ndarray, mask: np.ndarray) -> int:
    """Voxels inside ``mask`` whose value differs (in real units) between the two images."""
    return int(np.count_nonzero((np.asarray(original) != np.asarray(defaced)) & mask))


@contextmanager
def _private_tempdir() -> Iterator[None]:
    """Send ``tempfile`` names to a folder deleted afterwards: antspyx's Atropos writes its
    probability maps under a ``mktemp`` name in the temp folder and never removes them."""
    with tempfile.TemporaryDirectory(prefix="mideface-atropos-") as tmp:
        saved, tempfile.tempdir = tempfile.tempdir, tmp
        try:
            yield
        finally:
            tempfile.tempdir = saved


def tissue_volumes_ml(
    img: nib.spatialimages.SpatialImage, brain_mask: np.ndarray
) -> dict[str, float]:
    """CSF, GM and WM volumes (mL) by ANTs Atropos (k-means start, MRF) inside a brain mask.

    The segmentation step of antsAtroposN4 / smriprep at ``TISSUE_MM``: N4 fits the bias field
    to the brain only (the mask), then Atropos classifies the brain. A whole-head N4 would let
    the face move the bias field, and with it every class, by 1-8 % for any defacer (even one
    that changes no brain voxel): it would measure N4's instability, not the defacing.
    """
    ants = register.import_ants()
    data, aff = smooth_downsample(io.first_frame(img), img.affine, TISSUE_MM)
    mask = (resample(brain_mask.astype(np.float32), img.affine, data.shape, aff) > 0.5).astype(
        np.float32
    )
    mask_img = register.to_ants(mask, aff)
    image = ants.n4_bias_field_correction(
        register.to_ants(data, aff),
        mask=mask_img,
        shrink_factor=N4_SHRINK,
        convergence={"iters": list(N4_ITERS), "tol": 1e-7},
    )
    with _private_tempdir():
        seg = ants.atropos(
            a=image,
            x=mask_img,
            i=f"kmeans[{len(TISSUES)}]",
            m="[0.1,1x1x1]",
            c="[5,0]",
            r=0,  # Atropos seeds its sampler from the clock unless told not to
        )["segmentation"].numpy()
    voxel_ml = TISSUE_MM**3 / 1000.0
    return {
        name: float(np.count_nonzero(seg == k + 1) * voxel_ml) for k, name in enumerate(TISSUES)
    }


def percent_change(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-key change from ``before`` to ``after`` in percent of ``before``."""
    return {k: 100.0 * (after[k] - before[k]) / before[k] for k in before}


# ---------------------------------------------------------------- cost


#: A tiny launcher that spawns the measured command and reports its wall time and peak memory.
#: The launcher, not the (large) harness, forks the command: a child forked from a big process
#: counts the parent's resident pages in its peak until it execs.
_LAUNCHER = """
import os, sys, time
start = time.perf_counter()
devnull = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ, file_actions=devnull)
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (GB) of one whole process; raises if it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"{' '.join(cmd[:4])} ... could not be run: {proc.stderr.strip()}")
    wall, peak_kb, code = proc.stdout.split()
    if int(code) != 0:
        last = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({code}): {last[0]}")
    return float(wall), int(peak_kb) / 1024**2
