"""Contrast-adaptive whole-head segmentation ("SAMSEG-style"): atlas priors + GMM + bias field, EM.

MiDeFace protects brain, skull and eyes from defacing with a SAMSEG segmentation (Puonti et al.
2016, NeuroImage 143:235). This module does the same job at ``SEGMENT_MM`` in a few seconds:

1. Priors: the atlas tissue priors, with a skull shell added to the bone prior (the skull encloses
   the brain, ``SKULL_SHELL_MM``) and each class blurred by ``PRIOR_SMOOTH_MM`` in atlas space (an
   affine registration cannot align sharp single-template boundaries), are sampled through the
   registration at every head voxel of an axis-aligned ``segment_mm`` grid (the subject is
   resampled onto it anti-aliased and cropped to its head). Every class keeps ``PRIOR_FLOOR``.
2. Model, inside the head mask: ``log(I + offset) = bias + tissue``. Each class is a mixture of
   ``N_COMPONENTS[class]`` Gaussians whose means and variances are learned from the image, so
   nothing about T1w, T2w, PD or FLAIR contrast is assumed; the bias field is a smooth
   multiplicative field (additive in log space) spanned by Legendre polynomials of total degree
   1..``BIAS_ORDER``. Voxels outside the head mask are air.
3. EM on every ``FIT_STEP``-th voxel along each axis (SPM-style sampling): means and variances start
   from prior-weighted statistics; each iteration computes the responsibilities (prior x Gaussian),
   updates the mixtures, and refits the bias field by weighted least squares on the precision-
   weighted residuals (as in SPM's unified segmentation and SAMSEG). EM stops when the mean
   log-likelihood per voxel gains less than ``EM_TOLERANCE`` or after ``EM_ITERATIONS``. The fitted
   model then gives the posteriors of every head voxel.
4. A mean-field Potts MRF (``MRF_BETA``, 6-neighbourhood, ``MRF_ITERATIONS`` sweeps) regularises
   the posteriors.
5. The posteriors are resampled linearly onto the input grid (through the affines, so any
   orientation or voxel size works) and arg-maxed into labels (``SEG_LABELS``).

``exclusion_mask`` turns a segmentation into the voxels defacing must not modify: the brain (the
connected CSF/GM/WM inside the skull), bone and eyes, dilated and kept inside the head mask.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from mideface_nipype.engine.atlas import CLASSES, Atlas
from mideface_nipype.engine.exclusion import XMASK_DILATE_VOX, finish_exclusion_mask
from mideface_nipype.utils.geometry import box_affine, mask_box, smooth_downsample, voxel_sizes

LOGGER = logging.getLogger(__name__)

#: Grid spacing (mm) on which the model is fitted.
SEGMENT_MM = 2.0
#: Maximum number of EM iterations, and the gain of the mean log-likelihood per voxel (nats) per
#: iteration below which EM stops (late iterations only split the soft-tissue mixture further).
EM_ITERATIONS = 50
EM_TOLERANCE = 2e-4
#: EM fits the model on every FIT_STEP-th voxel of the grid along each axis (SPM's sampling).
FIT_STEP = 2
#: Bias field: Legendre polynomials in the three axes up to this total degree (0 = no bias field).
BIAS_ORDER = 3
#: Classes left out of the bias fit (air in sinuses and at the skin is mostly noise).
BIAS_EXCLUDED = ("air",)
#: Ridge regularisation of the bias coefficients (relative to the mean weight).
BIAS_RIDGE = 1e-3
#: Gaussians per class (the classes of ``atlas.CLASSES``).
N_COMPONENTS = {"air": 2, "soft": 3, "bone": 1, "csf": 1, "gm": 1, "wm": 1, "eyes": 2}
#: Blur (FWHM, atlas mm) of the priors per class (more for the brain, whose folding and size vary
#: most between heads), and the probability every class keeps inside the head.
PRIOR_SMOOTH_MM = {
    "air": 4.0,
    "soft": 4.0,
    "bone": 4.0,
    "csf": 6.0,
    "gm": 8.0,
    "wm": 8.0,
    "eyes": 4.0,
}
PRIOR_FLOOR = 1e-4
#: Skull shell added to the bone prior: from / to / fading out at these distances (mm) outside the
#: atlas brain, with this probability taken from soft tissue (0 mm fade: the atlas prior as is).
SKULL_SHELL_MM = (1.0, 8.0, 12.0)
SKULL_SHELL_BONE = 0.85
#: Mean-field Potts MRF: interaction strength per agreeing neighbour, and number of sweeps.
MRF_BETA = 0.3
MRF_ITERATIONS = 3
#: Offset (fraction of the robust maximum in the head) added before taking logarithms.
LOG_OFFSET_FRAC = 0.01
#: Variance floor (log units) of every Gaussian.
MIN_VARIANCE = 1e-3

#: Label values in the output volume.
SEG_LABELS = {"air": 0, "soft": 1, "bone": 2, "csf": 3, "gm": 4, "wm": 5, "eyes": 6}
#: Classes whose voxels the exclusion mask protects (brain only inside the skull).
PROTECTED_CLASSES = ("csf", "gm", "wm", "bone", "eyes")
BRAIN_CLASSES = ("csf", "gm", "wm")

assert tuple(SEG_LABELS) == CLASSES and list(SEG_LABELS.values()) == list(range(len(CLASSES)))


@dataclass
class Segmentation:
    """A segmentation on the subject's input grid."""

    labels: np.ndarray  # uint8, values of SEG_LABELS
    posteriors: np.ndarray | None  # float32, shape + (K,), sums to 1 over K; None unless asked
    class_means: dict = field(default_factory=dict)  # bias-corrected intensity per class
    class_stds: dict = field(default_factory=dict)
    icv_ml: float = 0.0  # csf + gm + wm posteriors summed, in mL
    iterations: int = 0
    log_likelihood: list = field(default_factory=list)


def _legendre_1d(n: int, order: int) -> np.ndarray:
    """Legendre polynomials 0..order on n points spanning [-1, 1] -> (order + 1, n)."""
    x = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
    return np.stack([np.polynomial.legendre.Legendre.basis(d)(x) for d in range(order + 1)])


def _bias_terms(order: int) -> list[tuple[int, int, int]]:
    """Degree triples of the bias basis: total degree 1..order (the constant is in the means)."""
    return [
        (dx, dy, dz)
        for dx in range(order + 1)
        for dy in range(order + 1 - dx)
        for dz in range(order + 1 - dx - dy)
        if dx + dy + dz > 0
    ]


class BiasBasis:
    """Legendre polynomials of total degree 1..order over a box; a smooth field in log space.

    Columns are standardised (zero mean, unit variance) over the fitting voxels, so that a constant
    offset stays in the class means; otherwise means and field trade a common shift and EM creeps
    along that valley.
    """

    def __init__(self, shape: tuple[int, ...], order: int, fit_index: tuple[np.ndarray, ...]):
        self.legendre = [_legendre_1d(n, order) for n in shape]
        self.terms = _bias_terms(order)
        raw = self._columns(fit_index)
        self.mean = raw.mean(0) if raw.size else np.zeros(0)
        self.scale = np.maximum(raw.std(0), 1e-12) if raw.size else np.zeros(0)
        self.fit_matrix = (raw - self.mean) / self.scale  # (N_fit, P)

    def _columns(self, index: tuple[np.ndarray, ...]) -> np.ndarray:
        leg = self.legendre
        cols = [
            leg[0][dx][index[0]] * leg[1][dy][index[1]] * leg[2][dz][index[2]]
            for dx, dy, dz in self.terms
        ]
        return np.stack(cols, axis=1) if cols else np.zeros((index[0].size, 0))

    def field(self, coef: np.ndarray, index: tuple[np.ndarray, ...]) -> np.ndarray:
        """The field (log units) at the voxels ``index``, one basis term at a time."""
        scaled = coef / self.scale if coef.size else coef
        out = np.full(index[0].size, -float(scaled @ self.mean) if coef.size else 0.0)
        leg = self.legendre
        for c, (dx, dy, dz) in zip(scaled, self.terms, strict=True):
            out += c * (leg[0][dx][index[0]] * leg[1][dy][index[1]] * leg[2][dz][index[2]])
        return out


def _mrf_neighbours(post: np.ndarray) -> np.ndarray:
    """Sum over the 6 face neighbours of each voxel's posteriors (volume shape + (K,))."""
    out = np.zeros_like(post)
    for axis in range(3):
        sl_a = [slice(None)] * 4
        sl_b = [slice(None)] * 4
        sl_a[axis], sl_b[axis] = slice(1, None), slice(None, -1)
        out[tuple(sl_a)] += post[tuple(sl_b)]
        out[tuple(sl_b)] += post[tuple(sl_a)]
    return out


@dataclass
class _Mixture:
    """Parameters of the intensity model (log units, bias removed)."""

    comp_class: np.ndarray  # (C,) class index of each Gaussian
    mean: np.ndarray  # (C,)
    var: np.ndarray  # (C,)
    weight: np.ndarray  # (C,) within-class mixing weights
    coef: np.ndarray  # (P,) bias coefficients

    def class_likelihood(self, y: np.ndarray, n_classes: int) -> np.ndarray:
        """p(y | class) up to a per-voxel factor -> (N, K)."""
        lik = y[:, None] - self.mean
        np.square(lik, out=lik)
        lik *= -0.5 / self.var
        lik += np.log(self.weight) - 0.5 * np.log(2.0 * np.pi * self.var)
        lik -= lik.max(1, keepdims=True)
        np.exp(lik, out=lik)
        return lik @ np.eye(n_classes)[self.comp_class]


def _init_mixture(y: np.ndarray, prior: np.ndarray, ncomp: dict[str, int], n_terms: int):
    """Means and variances from prior-weighted statistics; a class's Gaussians spread about them."""
    comp_class = np.concatenate([[k] * ncomp[c] for k, c in enumerate(CLASSES)]).astype(int)
    mean = np.empty(comp_class.size)
    var = np.empty(comp_class.size)
    weight = np.empty(comp_class.size)
    for k in range(len(CLASSES)):
        sel = comp_class == k
        p = prior[:, k]
        mu = float(p @ y / p.sum())
        v = float(p @ (y - mu) ** 2 / p.sum()) + MIN_VARIANCE
        nk = int(sel.sum())
        spread = np.linspace(-1.0, 1.0, nk) if nk > 1 else np.zeros(1)
        mean[sel] = mu + spread * np.sqrt(v) * 0.5
        var[sel] = v / nk
        weight[sel] = 1.0 / nk
    return _Mixture(comp_class, mean, var, weight, np.zeros(n_terms))


def _responsibilities(
    yc: np.ndarray, mix: _Mixture, log_prior: np.ndarray
) -> tuple[np.ndarray, float]:
    """E-step: (N, C) responsibilities and the mean log-likelihood per voxel."""
    const = np.log(mix.weight) - 0.5 * np.log(2.0 * np.pi * mix.var)
    gamma = yc[:, None] - mix.mean
    np.square(gamma, out=gamma)
    gamma *= -0.5 / mix.var
    gamma += const
    gamma += log_prior
    top = gamma.max(1)
    gamma -= top[:, None]
    np.exp(gamma, out=gamma)
    total = gamma.sum(1)
    gamma /= total[:, None]
    return gamma, float(np.mean(np.log(total) + top))


def _fit_em(
    y: np.ndarray,
    prior: np.ndarray,
    basis: np.ndarray,
    mix: _Mixture,
    iterations: int,
    tolerance: float,
) -> tuple[_Mixture, list[float]]:
    """EM for the mixtures and the bias field (in place on ``mix``); returns the log-likelihoods.

    Sums over voxels are ``einsum`` contractions (no BLAS threads for skinny products), so an
    iteration costs a few passes over the (N, C) responsibilities.
    """
    log_prior = np.log(prior[:, mix.comp_class])
    fit_bias = np.array([CLASSES[k] not in BIAS_EXCLUDED for k in mix.comp_class], dtype=float)
    onehot = np.eye(prior.shape[1])[mix.comp_class]
    history: list[float] = []
    for _ in range(iterations):
        yc = y - np.einsum("np,p->n", basis, mix.coef)
        gamma, log_lik = _responsibilities(yc, mix, log_prior)
        history.append(log_lik)
        # mixtures
        nc = gamma.sum(0) + 1e-10
        mix.mean = np.einsum("n,nc->c", yc, gamma) / nc
        mix.var = np.einsum("n,nc->c", yc * yc, gamma) / nc - mix.mean**2
        mix.var = np.maximum(mix.var, 0.0) + MIN_VARIANCE
        mix.weight = nc / (nc @ onehot)[mix.comp_class]
        # bias field: weighted least squares of the residuals y - mean (precision-weighted)
        if basis.shape[1]:
            prec = fit_bias / mix.var
            w = np.einsum("nc,c->n", gamma, prec)
            wr = y * w - np.einsum("nc,c->n", gamma, prec * mix.mean)
            lhs = basis.T @ (basis * w[:, None])
            lhs += BIAS_RIDGE * np.trace(lhs) / lhs.shape[0] * np.eye(lhs.shape[0])
            mix.coef = np.linalg.solve(lhs, np.einsum("np,n->p", basis, wr))
        if len(history) > 1 and abs(history[-1] - history[-2]) < tolerance:
            break
    return mix, history


def _subsample(mask: np.ndarray, step: int) -> np.ndarray:
    """Boolean selection (over the mask's voxels) of those on a grid of every ``step``-th voxel."""
    keep = np.zeros(mask.shape, dtype=bool)
    keep[::step, ::step, ::step] = True
    return keep[mask]


_PRIOR_CACHE: dict[tuple, tuple] = {}
#: Input voxels labelled at a time by ``_labels_on_input_grid`` (bounds a 1 mm head's memory).
_LABEL_CHUNK_VOXELS = 1_000_000


def _prior_stack(atlas: Atlas, fwhm_mm: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """The atlas priors as one read-only (X, Y, Z, K) float32 array (``CLASSES`` order), affine.

    Each class is blurred by its ``fwhm_mm`` in atlas space (an affine cannot align sharp template
    boundaries exactly).

    The skull encloses the brain: the bone prior is raised to ``SKULL_SHELL_BONE`` in a shell from
    ``SKULL_SHELL_MM[0]`` to ``[1]`` mm outside the atlas brain, fading out by ``[2]`` mm, taking
    the mass from soft tissue only (eyes and air keep theirs). This fills the gaps of a bone prior
    drawn from the dark band of an average head (diploe, thin temporal bone). Cached per atlas.
    """
    images = tuple(atlas.priors[c] for c in CLASSES)
    blur = tuple(float(fwhm_mm.get(c, 0.0)) for c in CLASSES)
    key = (tuple(id(img) for img in images), blur, SKULL_SHELL_MM, SKULL_SHELL_BONE)
    if key in _PRIOR_CACHE:
        return _PRIOR_CACHE[key][1:]
    affine = images[0].affine
    stack = np.stack([np.asarray(img.dataobj, np.float32) for img in images], -1)
    lo, hi, fade = SKULL_SHELL_MM
    zooms = voxel_sizes(affine)
    if fade > 0:
        idx = {c: i for i, c in enumerate(CLASSES)}
        brain = ndi.binary_fill_holes(stack[..., [idx[c] for c in BRAIN_CLASSES]].sum(-1) > 0.5)
        # the shell ends ``fade`` mm from the brain: distances are needed in its box only
        box = mask_box(brain, int(np.ceil(fade / zooms.min())) + 1)
        dist = ndi.distance_transform_edt(~brain[box], sampling=zooms)
        shell = np.clip(dist / max(lo, 1e-6), 0, 1) * np.clip((fade - dist) / (fade - hi), 0, 1)
        bone, soft = stack[..., idx["bone"]][box], stack[..., idx["soft"]][box]
        gain = np.clip(np.minimum(SKULL_SHELL_BONE * shell, bone + soft) - bone, 0, None)
        bone += gain
        soft -= gain
    for k, fwhm in enumerate(blur):
        if fwhm > 0:
            stack[..., k] = ndi.gaussian_filter(stack[..., k], fwhm / 2.355 / zooms, mode="nearest")
    stack.setflags(write=False)
    _PRIOR_CACHE.clear()  # one atlas at a time; the images are kept alive with their ids
    _PRIOR_CACHE[key] = (images, stack, affine)
    return stack, affine


def _priors_at(
    stack: np.ndarray,
    stack_affine: np.ndarray,
    subject_to_atlas: np.ndarray,
    affine: np.ndarray,
    index: tuple[np.ndarray, ...],
    floor: float,
) -> np.ndarray:
    """Priors (N, K) at the subject voxels ``index`` of grid ``affine``: linear, floored, summing
    to one. Outside the atlas box everything is air."""
    vox = np.linalg.inv(stack_affine) @ subject_to_atlas @ affine
    coords = vox[:3, :3] @ np.stack(index).astype(np.float64) + vox[:3, 3:]
    prior = np.empty((index[0].size, stack.shape[-1]))
    for k in range(stack.shape[-1]):
        prior[:, k] = ndi.map_coordinates(
            stack[..., k], coords, order=1, mode="constant", cval=1.0 if k == 0 else 0.0
        )
    np.clip(prior, 0.0, None, out=prior)
    prior += floor
    prior /= prior.sum(1, keepdims=True)
    return prior


def segment(
    data: np.ndarray,
    affine: np.ndarray,
    head: np.ndarray,
    atlas: Atlas,
    subject_to_atlas: np.ndarray,
    *,
    segment_mm: float = SEGMENT_MM,
    em_iterations: int = EM_ITERATIONS,
    em_tolerance: float = EM_TOLERANCE,
    bias_order: int = BIAS_ORDER,
    n_components: dict[str, int] | None = None,
    prior_smooth_mm: float | dict[str, float] | None = None,
    prior_floor: float = PRIOR_FLOOR,
    mrf_beta: float = MRF_BETA,
    mrf_iterations: int = MRF_ITERATIONS,
    fit_step: int = FIT_STEP,
    with_posteriors: bool = False,
) -> Segmentation:
    """Segment a head into air, soft tissue, bone, CSF, GM, WM and eyes (see the module doc).

    ``data`` is a 3-D volume with voxel-to-RAS ``affine``, ``head`` its head mask (same grid),
    ``subject_to_atlas`` the 4x4 RAS matrix from ``register.register_atlas``. The class
    posteriors on the input grid are kept only ``with_posteriors`` (defacing needs the labels).
    """
    data = np.nan_to_num(np.asarray(data, dtype=np.float32))
    head = np.asarray(head) > 0
    if data.ndim != 3 or head.shape != data.shape:
        raise ValueError(
            f"segment needs a 3-D volume and a head mask of the same shape, got "
            f"{data.shape} and {head.shape}"
        )
    ncomp = dict(N_COMPONENTS if n_components is None else n_components)
    n_classes = len(CLASSES)

    # 1. the working grid, cropped to the head; priors pulled through the registration
    data_lo, aff_lo = smooth_downsample(np.clip(data, 0, None), affine, segment_mm)
    head_lo = smooth_downsample(head.astype(np.float32), affine, segment_mm)[0] > 0.5
    if not head_lo.any():
        raise ValueError("the head mask is empty on the segmentation grid")
    box = mask_box(head_lo, 2)
    data_lo, head_lo = data_lo[box], head_lo[box]
    aff_lo = box_affine(aff_lo, box)
    shape_lo = data_lo.shape
    if prior_smooth_mm is None:
        prior_smooth_mm = PRIOR_SMOOTH_MM
    smooth = (
        dict(prior_smooth_mm)
        if isinstance(prior_smooth_mm, dict)
        else dict.fromkeys(CLASSES, float(prior_smooth_mm))
    )
    index = np.nonzero(head_lo)
    stack, stack_affine = _prior_stack(atlas, smooth)
    prior = _priors_at(stack, stack_affine, subject_to_atlas, aff_lo, index, prior_floor)

    # 2. log intensities in the head
    values = data_lo[head_lo].astype(np.float64)
    offset = LOG_OFFSET_FRAC * max(float(np.percentile(values, 99.0)), 1e-12)
    y = np.log(values + offset)
    y0 = float(np.median(y))
    y -= y0

    # 3. EM on a subsample (SPM-style sampling), then the model on every voxel
    sub = _subsample(head_lo, fit_step)
    bias = BiasBasis(shape_lo, bias_order, tuple(i[sub] for i in index))
    basis_sub = bias.fit_matrix
    mix = _init_mixture(y[sub], prior[sub], ncomp, basis_sub.shape[1])
    mix, history = _fit_em(y[sub], prior[sub], basis_sub, mix, em_iterations, em_tolerance)
    LOGGER.debug("EM history %s", np.round(history, 5).tolist())
    LOGGER.info("segmentation EM: %d iterations, log-likelihood %.4f", len(history), history[-1])
    yc = y - bias.field(mix.coef, index)
    unary = prior * mix.class_likelihood(yc, n_classes)
    post = unary / unary.sum(1, keepdims=True)

    # 4. MRF (mean field)
    if mrf_beta > 0 and mrf_iterations > 0:
        vol = np.zeros(shape_lo + (n_classes,), dtype=np.float32)
        vol[..., 0] = 1.0
        for _ in range(mrf_iterations):
            vol[head_lo] = post
            nbr = _mrf_neighbours(vol)[head_lo]
            post = unary * np.exp(mrf_beta * (nbr - nbr.max(1, keepdims=True)))
            post /= post.sum(1, keepdims=True)
        del vol

    # statistics in input intensity units (bias-corrected)
    corrected = np.exp(yc + y0) - offset
    class_means, class_stds = {}, {}
    for k, name in enumerate(CLASSES):
        p = post[:, k]
        s = p.sum()
        mu = float(p @ corrected / s) if s > 0 else float("nan")
        class_means[name] = mu
        class_stds[name] = float(np.sqrt(p @ (corrected - mu) ** 2 / s)) if s > 0 else float("nan")
    brain_idx = [CLASSES.index(c) for c in BRAIN_CLASSES]
    icv_ml = float(post[:, brain_idx].sum() * segment_mm**3 / 1000.0)

    # 5. back to the input grid
    post_lo = np.zeros(shape_lo + (n_classes,), dtype=np.float32)
    post_lo[..., 0] = 1.0
    post_lo[head_lo] = post
    if with_posteriors:
        posteriors = _to_input_grid(post_lo, aff_lo, head, affine)
        labels = np.argmax(posteriors, axis=-1).astype(np.uint8)
    else:
        posteriors, labels = None, _labels_on_input_grid(post_lo, aff_lo, head, affine)
    return Segmentation(
        labels=labels,
        posteriors=posteriors,
        class_means=class_means,
        class_stds=class_stds,
        icv_ml=icv_ml,
        iterations=len(history),
        log_likelihood=history,
    )


def _posterior_parts(
    post_lo: np.ndarray,
    aff_lo: np.ndarray,
    head: np.ndarray,
    affine: np.ndarray,
    box: tuple[slice, ...],
) -> Iterator[np.ndarray]:
    """Each class's posterior, linearly resampled onto ``box`` of the input grid (float32), the
    voxels outside the head set to air (1 for air, 0 for the others).

    Linear weights sum to one and the fill values (air 1, others 0) are a valid posterior, so the
    classes sum to one without renormalising. Grids that differ only by axis order, flips and
    scale (the usual case) take scipy's fast separable path; on oblique grids only the head's
    voxels are sampled.
    """
    shape_box = tuple(s.stop - s.start for s in box)
    aff_box = box_affine(affine, box)
    vox = np.linalg.inv(aff_lo) @ aff_box  # input box voxel -> lo voxel
    lin = vox[:3, :3]
    perm = np.argmax(np.abs(lin), axis=1)
    # one non-zero per row, on distinct columns: lo axis r samples input axis perm[r]
    separable = sorted(perm) == [0, 1, 2] and np.allclose(
        lin * (1.0 - np.eye(3)[perm]), 0.0, atol=1e-6 * np.abs(lin).max()
    )
    # separable case: zoom_shift wants positive zooms, so flipped axes are sampled reversed
    scale = lin[np.arange(3), perm]
    shape_t = np.array([shape_box[p] for p in perm])
    flip = scale < 0
    offset = vox[:3, 3] + np.where(flip, scale * (shape_t - 1), 0.0)
    in_head = head[box]
    if not separable:
        lo_coords = lin @ np.nonzero(in_head) + vox[:3, 3:]
    for k in range(post_lo.shape[-1]):
        cval = 1.0 if k == 0 else 0.0
        if separable:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "1-D matrix" notice
                part = ndi.affine_transform(
                    post_lo[..., k],
                    np.abs(scale),
                    offset,
                    output_shape=tuple(int(n) for n in shape_t),
                    order=1,
                    mode="constant",
                    cval=cval,
                    prefilter=False,
                )
            part = np.transpose(
                part[tuple(slice(None, None, -1) if f else slice(None) for f in flip)],
                np.argsort(perm),
            )
        else:
            part = np.full(shape_box, cval, dtype=np.float32)
            part[in_head] = ndi.map_coordinates(
                post_lo[..., k], lo_coords, order=1, mode="constant", cval=cval, prefilter=False
            )
        part[~in_head] = cval
        yield part


def _to_input_grid(
    post_lo: np.ndarray, aff_lo: np.ndarray, head: np.ndarray, affine: np.ndarray
) -> np.ndarray:
    """The class posteriors on the input grid (``_posterior_parts``; air outside the head)."""
    out = np.zeros(head.shape + (post_lo.shape[-1],), dtype=np.float32)
    out[..., 0] = 1.0
    if head.any():
        box = mask_box(head, 1)
        for k, part in enumerate(_posterior_parts(post_lo, aff_lo, head, affine, box)):
            out[box + (k,)] = part
    return out


def _labels_on_input_grid(
    post_lo: np.ndarray, aff_lo: np.ndarray, head: np.ndarray, affine: np.ndarray
) -> np.ndarray:
    """``argmax`` of ``_to_input_grid`` (the first class on ties), interpolating only where needed.

    Linear interpolation is a convex mix of a cell's 8 corners: where all 8 share one argmax, so
    does every point of the cell, and the label is read off the low grid. Only the voxels of
    mixed cells (tissue borders) are interpolated, class by class: a 1 mm head's posteriors are
    0.4-0.7 GB and took seconds to resample everywhere.
    """
    labels = np.zeros(head.shape, dtype=np.uint8)  # air
    voxels = np.flatnonzero(head)
    vox = np.linalg.inv(aff_lo) @ affine  # input voxel -> low voxel
    # one layer of air around the low grid: beyond it interpolation only sees the air fill value
    low = np.pad(np.argmax(post_lo, axis=-1).astype(np.uint8), 1)
    corner = low[:-1, :-1, :-1]
    uniform = np.ones(corner.shape, dtype=bool)
    for dx, dy, dz in np.ndindex(2, 2, 2):
        uniform &= (
            low[dx : dx + corner.shape[0], dy : dy + corner.shape[1], dz : dz + corner.shape[2]]
            == corner
        )
    last_cell = np.array(post_lo.shape[:3])[:, None]
    flat_labels = labels.reshape(-1)
    for start in range(0, voxels.size, _LABEL_CHUNK_VOXELS):
        chunk = voxels[start : start + _LABEL_CHUNK_VOXELS]
        index = np.stack(np.unravel_index(chunk, head.shape)).astype(np.float64)
        coords = vox[:3, :3] @ index + vox[:3, 3:]
        cell = np.floor(coords).astype(np.intp) + 1  # lowest corner, in the padded grid
        inside = np.all((cell >= 0) & (cell <= last_cell), axis=0)
        at = tuple(cell[:, inside])
        out = np.zeros(chunk.size, dtype=np.uint8)
        out[inside] = corner[at]
        mixed = np.flatnonzero(inside)[~uniform[at]]
        best = np.full(mixed.size, -np.inf, dtype=np.float32)
        for k in range(post_lo.shape[-1] if mixed.size else 0):
            part = ndi.map_coordinates(
                post_lo[..., k],
                coords[:, mixed],
                order=1,
                mode="constant",
                cval=1.0 if k == 0 else 0.0,
                prefilter=False,
            )
            better = part > best
            out[mixed[better]] = k
            best[better] = part[better]
        flat_labels[chunk] = out
    return labels


def exclusion_mask(
    seg: Segmentation, head: np.ndarray, dilate_vox: int = XMASK_DILATE_VOX
) -> np.ndarray:
    """Voxels defacing must not touch: brain inside the skull, bone and eyes, dilated, in the head.

    The brain is the largest connected component of the CSF/GM/WM labels with its holes filled, so
    that fluid elsewhere (sinuses, a T2-bright neck) is not protected.
    """
    labels = seg.labels
    brain = brain_mask(labels)
    protected = brain.copy()
    for name in PROTECTED_CLASSES:
        if name not in BRAIN_CLASSES:
            protected |= labels == SEG_LABELS[name]
    return finish_exclusion_mask(protected, head, dilate_vox)


def brain_mask(labels: np.ndarray) -> np.ndarray:
    """Largest connected component of the CSF/GM/WM labels, holes filled (bool)."""
    brain = np.isin(labels, [SEG_LABELS[c] for c in BRAIN_CLASSES])
    lab, n = ndi.label(brain)
    if n == 0:
        return brain
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return ndi.binary_fill_holes(lab == np.argmax(sizes))


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL."""
    return float(np.prod(voxel_sizes(affine))) / 1000.0
