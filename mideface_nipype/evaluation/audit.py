"""Which images of a dataset still show a face, whichever tool (or none) defaced them.

An image is judged the way an attacker would look at it: its skin surface is rendered in the
atlas pose from the front and from +-30 deg (``metrics.render_views``, the privacy evaluation's
renderer and light) and dlib's face detector and 68 landmarks look for a face. The atlas face
(lower and upper face, nose, eyes) mapped into the image through the engine's atlas registration
says where the face should be, so an image without a detectable face can be told apart:

1. ``defaced`` / ``zeroed/cut``: no skin where the atlas nose lies (zeroed voxels, a cutting
   plane). The nose is the face's most protruding part: every cut or zeroing that removes the
   face removes it, and a recogniser reads the face's relief. This comes before the detector,
   which also reads the orbits left behind a cutting plane as a (weak) face.
2. ``face in view`` (FLAGGED): a face with plausible landmarks where the atlas face lies, in at
   least ``MIN_VIEWS`` of the three views.
3. ``face out of view``: the atlas face lies mostly (or, with no face found, partly) outside
   the image box.
4. ``defaced`` / ``noise fill/other``: skin lies over the face, yet no face is found.

An image with the provenance code (``fill.check_code``) or the NIfTI ``descrip`` stamp of this
package is examined like any other (a face mask applied through a wrong registration is stamped
too): with a face in view it is flagged (``stamped by mideface``), and so it is when it carries
this package's code and the atlas nose has skin (``stamped by mideface, nose untouched``: the
fill always moves the nose); otherwise it is ``defaced`` / ``mideface``.

The region measures need the registration: below the engine's head Dice (``MIN_HEAD_DICE``)
they are not trusted, and the detector alone decides (a face or ``noise fill/other``).

Needs the ``eval`` extra (``dlib-bin``, ``face_recognition_models``; no download at run time).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from mideface_nipype.engine import fill, headmask, register
from mideface_nipype.engine.atlas import load_atlas
from mideface_nipype.evaluation import metrics
from mideface_nipype.reports import render
from mideface_nipype.utils import io
from mideface_nipype.utils.geometry import GridImage, apply_affine, voxel_sizes

#: Views rendered and searched for a face (yaw, deg): the evaluation's probe views.
YAWS_DEG = metrics.PROBE_YAWS_DEG
#: Views with a valid face detection needed to flag an image.
MIN_VIEWS = 2
#: A face must be wider than this (mm): smaller boxes are texture, not a head-sized face.
MIN_FACE_WIDTH_MM = 60.0
#: dlib's 68 landmarks after the 17 of the jaw line: brows, nose, eyes, mouth (the inner face).
BROWS, NOSE, EYES, MOUTH = slice(17, 27), slice(27, 36), slice(36, 48), slice(48, 68)
INNER = slice(17, 68)
#: Fraction of the inner landmarks that must lie on the atlas face region of the view. Intact
#: faces here: 0.84-1.0 (the jaw line, 0.6-0.7, follows each head's own outline and is left out).
MIN_LANDMARKS_ON_FACE = 0.7
#: Below this fraction of the atlas face inside the image box, the face is out of view.
MIN_FACE_IN_BOX = 0.5
#: Below this fraction, with skin on the part in view but no face found, the face is cut by the
#: box (chris_PD, colin27 0.5, chris_T1w 0.7 here) rather than defaced; whole faces reach 1.0.
FULL_FACE_IN_BOX = 0.9
#: An atlas nose vertex farther than this (mm) from the subject's skin has no nose under it.
NOSE_GAP_MM = 4.0
#: Above this fraction of atlas nose vertices without skin, the face was zeroed or cut away
#: (7 intact heads here: <= 0.06; quickshear 0.56-1.0, the pydeface method 1.0).
MAX_NOSE_WITHOUT_SKIN = 0.5
#: The NIfTI ``descrip`` that this package writes into every defaced volume.
DESCRIP_STAMP = io.defaced_descrip().rsplit(" ", 1)[0]

FACE_IN_VIEW = "face in view"
DEFACED = "defaced"
OUT_OF_VIEW = "face out of view"
BY_MIDEFACE = "mideface"
#: The reasons of a flagged image that carries this package's provenance code or stamp: a face
#: is found, or the nose has skin where the atlas nose lies (this package's fill always moves the
#: nose: its defaced heads here leave no skin within ``NOSE_GAP_MM`` of 0.97-1.0 of the atlas
#: nose, the median gap 5.4-11.5 mm).
STAMPED = "stamped by mideface"
STAMPED_NOSE = "stamped by mideface, nose untouched"
ZEROED = "zeroed/cut"
NOISE = "noise fill/other"


class MissingEvalExtra(ImportError):
    """dlib or its models are not installed."""


def check_eval_extra() -> None:
    """Raise ``MissingEvalExtra`` (one line saying what to install) without dlib or its models."""
    try:
        import dlib  # noqa: F401
        import face_recognition_models  # noqa: F401
    except ImportError as err:
        raise MissingEvalExtra(
            f"face detection needs the 'eval' extra ({err.name} is missing): "
            "pip install 'mideface-nipype[eval]'"
        ) from err


@dataclass(frozen=True)
class Detection:
    """One view's best face: detector score, box width (mm) and whether it passed the checks."""

    yaw_deg: float
    score: float
    width_mm: float
    on_face: float
    valid: bool


@dataclass
class AuditResult:
    """The verdict on one image and the measures behind it (NaN: not measured)."""

    path: str
    verdict: str
    reason: str = ""
    views_with_face: int = 0
    detections: list[Detection] = field(default_factory=list)
    face_in_box: float = float("nan")
    nose_without_skin: float = float("nan")
    head_dice: float = float("nan")
    seconds: float = 0.0
    renders: dict[float, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def flagged(self) -> bool:
        return self.verdict == FACE_IN_VIEW


def has_provenance(
    img: nib.spatialimages.SpatialImage, codes: Sequence[str] = fill.KNOWN_CODES
) -> bool:
    """Whether this package (or, by default, FreeSurfer's MiDeFace) defaced the image: one of
    ``codes`` or this package's descrip stamp."""
    if isinstance(img.header, nib.Nifti1Header):  # NIfTI-2 headers are NIfTI-1 headers too
        if DESCRIP_STAMP in bytes(img.header["descrip"]).decode("latin-1"):
            return True
    return fill.check_code(io.stored_data(img), codes)


def subject_to_atlas(
    data: np.ndarray, affine: np.ndarray, head: np.ndarray
) -> tuple[np.ndarray, float]:
    """The engine's affine subject -> atlas (MNI) RAS matrix and the head Dice it reaches.

    Its refusals are off: a defaced head misses the face the atlas has, and a face cut by the box
    lowers the Dice; the audit only needs to know roughly where the face is.
    """
    atlas = load_atlas()
    return register.register_atlas(
        GridImage(data, affine, head),
        atlas,
        min_head_dice=0.0,
        min_pose_ratio=0.0,
    )


def atlas_vertices_mm(to_atlas: np.ndarray, labels: tuple[str, ...]) -> np.ndarray:
    """The atlas surface vertices of ``labels`` in subject mm."""
    atlas = load_atlas()
    index = np.concatenate([atlas.labels[name] for name in labels])
    return apply_affine(np.linalg.inv(to_atlas), atlas.surface.vertices[index])


def _in_box(vox: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.all((vox > -0.5) & (vox < np.asarray(shape[:3]) - 0.5), axis=1)


def face_coverage(
    data: np.ndarray, affine: np.ndarray, to_atlas: np.ndarray
) -> tuple[float, float]:
    """Fraction of the atlas face inside the image box, and of the atlas nose without skin.

    Skin is the renders' head (``render.skin_volume``); a nose vertex has none when the head lies
    farther than ``NOSE_GAP_MM`` away (the affine puts the average nose within ~2 mm of a real
    one). NaN when less than half of the nose is inside the box.
    """
    to_vox = np.linalg.inv(affine)
    face = apply_affine(to_vox, atlas_vertices_mm(to_atlas, metrics.FACE_LABELS))
    nose = apply_affine(to_vox, atlas_vertices_mm(to_atlas, ("nose",)))
    face_in_box = float(_in_box(face, data.shape).mean())
    inside = _in_box(nose, data.shape)
    if inside.mean() < 0.5:
        return face_in_box, float("nan")
    level = render.skin_level(data)
    head = render.skin_volume(data, level) > level
    gap_mm = ndi.distance_transform_edt(~head, sampling=voxel_sizes(affine))
    idx = np.round(nose[inside]).astype(int)
    return face_in_box, float(np.mean(gap_mm[idx[:, 0], idx[:, 1], idx[:, 2]] > NOSE_GAP_MM))


def detect_face(picture: np.ndarray, yaw_deg: float) -> Detection:
    """The best face dlib finds in a render, and whether it is a real face where the face is.

    A detection counts when its box is head-sized (``MIN_FACE_WIDTH_MM``), its inner landmarks
    lie on the atlas face region of the view and brows, eyes, nose and mouth come in that order
    from the top: a face where the face is, upright, not texture elsewhere on the head.
    """
    detector, predictor, _ = metrics.dlib_models()
    picture = np.ascontiguousarray(picture, dtype=np.uint8)
    boxes, scores, _ = detector.run(picture, metrics.HOG_UPSAMPLE, metrics.HOG_MIN_SCORE)
    if not boxes:
        return Detection(yaw_deg, float("nan"), 0.0, 0.0, False)
    best = int(np.argmax(scores))
    box = boxes[best]
    shape = predictor(picture, box)
    points = np.array([(p.x, p.y) for p in shape.parts()])  # (68, 2): column, row
    region = metrics.face_region(yaw_deg)
    cols = np.clip(points[:, 0], 0, region.shape[1] - 1)
    rows = np.clip(points[:, 1], 0, region.shape[0] - 1)
    on_face = float(region[rows[INNER], cols[INNER]].mean())
    brows, eyes, nose, mouth = (points[part, 1].mean() for part in (BROWS, EYES, NOSE, MOUTH))
    upright = brows < eyes < nose < mouth  # image rows grow downwards
    width_mm = box.width() * render.PIXEL_MM
    valid = upright and on_face >= MIN_LANDMARKS_ON_FACE and width_mm >= MIN_FACE_WIDTH_MM
    return Detection(yaw_deg, float(scores[best]), width_mm, on_face, bool(valid))


def judge(
    views_with_face: int, face_in_box: float, nose_without_skin: float, head_dice: float
) -> tuple[str, str]:
    """Verdict and reason from the measures (provenance aside); rules in the module docstring."""
    outside = f"{100 * (1 - face_in_box):.0f}% of the face outside the box"
    trusted = head_dice >= register.MIN_HEAD_DICE
    if trusted and nose_without_skin > MAX_NOSE_WITHOUT_SKIN:
        return DEFACED, ZEROED
    if views_with_face >= MIN_VIEWS:
        return FACE_IN_VIEW, ""
    if trusted and face_in_box < MIN_FACE_IN_BOX:
        return OUT_OF_VIEW, outside
    if trusted and face_in_box < FULL_FACE_IN_BOX:
        return OUT_OF_VIEW, outside + ", no face in the rest"
    return DEFACED, NOISE


def audit_image(img: nib.spatialimages.SpatialImage, path: str = "") -> AuditResult:
    """The verdict on one loaded image; the renders are kept in the result."""
    start = time.perf_counter()
    data = io.first_frame(img)
    head = np.asarray(headmask.head_mask(img).dataobj) > 0
    to_atlas, dice = subject_to_atlas(data, img.affine, head)
    # rendered in the rigid part of the pose, as the privacy evaluation does (own proportions)
    centre = apply_affine(img.affine, np.argwhere(head)).mean(0)
    views = metrics.render_views(data, img.affine, metrics.rigid_part(to_atlas, centre), YAWS_DEG)
    renders = {yaw: rend.rgb() for yaw, rend in views.items()}
    detections = [detect_face(renders[yaw], yaw) for yaw in YAWS_DEG]
    n_faces = sum(d.valid for d in detections)
    in_box, nose_without_skin = face_coverage(data, img.affine, to_atlas)
    verdict, reason = judge(n_faces, in_box, nose_without_skin, dice)
    if has_provenance(img):  # it says who defaced the image, not that the face is gone
        trusted = dice >= register.MIN_HEAD_DICE
        if verdict == FACE_IN_VIEW:
            reason = STAMPED
        elif (
            trusted
            and nose_without_skin <= MAX_NOSE_WITHOUT_SKIN
            and has_provenance(img, (fill.CODE,))
        ):
            verdict, reason = FACE_IN_VIEW, STAMPED_NOSE
        else:
            verdict, reason = DEFACED, BY_MIDEFACE
    return AuditResult(
        path,
        verdict,
        reason,
        n_faces,
        detections,
        in_box,
        nose_without_skin,
        dice,
        time.perf_counter() - start,
        renders,
    )
