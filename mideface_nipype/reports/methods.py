"""The methods paragraph a paper can cite for one run (nipreps' ``__desc__`` boilerplate).

``methods_text`` writes, from the run's options and the installed versions, what was done to the
image, with every number taken from the engine module that defines it (so the text cannot drift
from the code), followed by the references it cites. The keywords are those of
``workflows.base.init_mideface_wf``, so a caller passes the factory's own arguments.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from mideface_nipype import __version__
from mideface_nipype.engine import atlas, bracket, exclusion, fill, headmask, register, segment
from mideface_nipype.engine.apply import XMASK_MARGIN_VOX

#: The works the text cites, by the key it cites them with (author, year).
REFERENCES = {
    "Avants et al., 2011": "Avants BB, Tustison NJ, Song G, Cook PA, Klein A, Gee JC. A "
    "reproducible evaluation of ANTs similarity metric performance in brain image registration. "
    "NeuroImage 54(3):2033-2044, 2011. doi:10.1016/j.neuroimage.2010.09.025",
    "Brett et al.": "Brett M, Markiewicz CJ, Hanke M, et al. nipy/nibabel. Zenodo. "
    "doi:10.5281/zenodo.591597",
    "Fonov et al., 2009": "Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased "
    "nonlinear average age-appropriate brain templates from birth to adulthood. NeuroImage "
    "47(Suppl 1):S102, 2009. doi:10.1016/S1053-8119(09)70884-5",
    "Gorgolewski et al., 2011": "Gorgolewski K, Burns CD, Madison C, Clark D, Halchenko YO, "
    "Waskom ML, Ghosh SS. Nipype: a flexible, lightweight and extensible neuroimaging data "
    "processing framework in Python. Front Neuroinform 5:13, 2011. "
    "doi:10.3389/fninf.2011.00013",
    "Greve, MiDeFace": "Greve DN. MiDeFace: minimally invasive defacing of MRI images. "
    "FreeSurfer, https://surfer.nmr.mgh.harvard.edu/fswiki/MiDeFace",
    "Puonti et al., 2016": "Puonti O, Iglesias JE, Van Leemput K. Fast and sequence-adaptive "
    "whole-brain segmentation using parametric Bayesian modeling. NeuroImage 143:235-249, 2016. "
    "doi:10.1016/j.neuroimage.2016.09.011",
}


def _mm(value: float) -> str:
    return f"{value:g} mm"


def _listed(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _atlas_meta(atlas_dir: str | None) -> dict:
    """What the atlas the run uses declares about itself (``atlas.json``: space, watermark)."""
    folder = Path(atlas_dir) if atlas_dir else atlas.atlas_dir()
    return json.loads((folder / atlas.META_FILE).read_text())


def _order(frac: float) -> str:
    """The order statistic ``frac`` of a label's distances, in words."""
    return "maximum" if frac == 1.0 else f"{100 * frac:g}th percentile"


def _exclusion_sentence(xmask_source: str) -> str:
    dilation = f"dilated by {exclusion.XMASK_DILATE_VOX} voxel within the head mask"
    if xmask_source == "segment":
        return (
            "The brain, skull and eyes were segmented by a contrast-adaptive Bayesian "
            "segmentation in the manner of SAMSEG (Puonti et al., 2016): the atlas tissue priors "
            "carried through the registration, one Gaussian mixture per tissue class fitted by "
            f"expectation-maximisation together with a smooth bias field at "
            f"{_mm(segment.SEGMENT_MM)}, and a Markov random field on the posteriors; these "
            f"labels, {dilation}, formed the exclusion mask."
        )
    if xmask_source == "atlas":
        return (
            "The brain and eyes of the atlas tissue priors (probability above "
            f"{exclusion.ATLAS_PROTECT_PROB:g}), carried through the registration, "
            f"{dilation}, formed the exclusion mask."
        )
    return "An exclusion mask supplied by the user (voxels above 0.5) was used."


def _fill_sentence(seed: int, fill_const: tuple[float, float] | None, stat_frame: int) -> str:
    if fill_const is not None:
        c_in, c_out = (abs(float(c)) for c in fill_const)
        return (
            f"The face compartments were set to {c_in:g} under the template face and {c_out:g} "
            "beyond it."
        )
    frame = "" if stat_frame == fill.STAT_FRAME else f", measured in frame {stat_frame},"
    return (
        "The face compartments were filled with uniform noise one standard deviation wide, "
        "centred on the mean of the head tissue under the template face (inside it) or on the "
        f"mode of the background beyond it (outside){frame}, drawn from NumPy's default "
        f"generator with seed {seed}."
    )


def _other_sentence(regheader: bool) -> str:
    how = (
        "taken as they lie in the scanner space of the reference image"
        if regheader
        else "rigidly registered to the reference image with ANTs (mutual information)"
    )
    return (
        f"The other images of the same head were {how} and defaced with its face mask, resampled "
        "by nearest neighbour, their fill statistics measured on each image itself; the "
        f"exclusion mask was carried along with a margin of {XMASK_MARGIN_VOX} voxel."
    )


def _label_caps(labels, field: str, default: float) -> str:
    """ " (nose, ears: at most 3 mm)" for the labels whose bound ``field`` is below ``default``."""
    capped = [spec for spec in labels if getattr(spec, field) < default]
    if not capped:
        return ""
    names = _listed([spec.name.replace("-", " ") for spec in capped])
    return f" ({names}: at most {_mm(max(getattr(spec, field) for spec in capped))})"


def methods_text(
    *,
    xmask_source: str = exclusion.DEFAULT_XMASK_SOURCE,
    ears: bool = True,
    forehead: bool = False,
    back_of_head: bool = False,
    ripple: bool = False,
    ripple_amp_mm: float = bracket.RIPPLE_AMP_MM,
    ripple_period_mm: float = bracket.RIPPLE_PERIOD_MM,
    seed: int = fill.DEFAULT_SEED,
    fill_const: tuple[float, float] | None = None,
    stat_frame: int = fill.STAT_FRAME,
    atlas_dir: str | None = None,
    init_transform: bool = False,
    other_contrasts: bool = False,
    regheader: bool = False,
    versions: Mapping[str, str] | None = None,
) -> str:
    """The methods paragraph of a run with these options, then the references it cites.

    ``versions`` maps ``nipype``, ``nibabel`` and ``antspyx`` to their versions; the default
    is ``reports.report.versions()``, the installed ones the report lists.
    """
    if xmask_source not in exclusion.XMASK_SOURCES:
        raise ValueError(
            f"xmask_source must be one of {exclusion.XMASK_SOURCES}, not {xmask_source!r}"
        )
    if versions is None:
        # imported here: the report module may cite this one
        from mideface_nipype.reports.report import versions as installed

        versions = installed()
    meta = _atlas_meta(atlas_dir)
    labels = bracket.select_labels(ears=ears, forehead=forehead, back_of_head=back_of_head)
    names = [spec.name.replace("-", " ") for spec in labels]
    shallow_s = _label_caps(labels, "dist_in_max_mm", bracket.DIST_IN_MAX_MM)
    short_s = _label_caps(labels, "dist_out_max_mm", bracket.DIST_OUT_MAX_MM)
    atlas_s = "the face atlas of the package" if not atlas_dir else f"the face atlas in {atlas_dir}"
    start = (
        "from a transform supplied by the user"
        if init_transform
        else f"from the best of the 24 axis rotations, each also turned by "
        f"±{register.SEARCH_TURN_DEG:g}° about each axis (ranked at {_mm(register.SEARCH_MM)})"
    )
    sentences = [
        f"The image was defaced with mideface-nipype {__version__}, a reimplementation of "
        "FreeSurfer's MiDeFace (minimally invasive defacing; Greve, MiDeFace) built as a Nipype "
        f"{versions['nipype']} workflow (Gorgolewski et al., 2011); images were read and "
        f"written with NiBabel {versions['nibabel']} (Brett et al.), and voxels outside "
        "the face mask were left unchanged, bit for bit.",
        "A head mask was made with the scan-line algorithm of FreeSurfer's mri_seghead "
        f"(intensities rescaled to 0-255 at the {100 * headmask.ROBUST_MAX_FRAC:g}th percentile, "
        f"threshold {headmask.THRESH1:g}, holes filled).",
        f"The head was registered to {atlas_s}, an average head with the whole face in "
        f"{meta['space'].split(' (')[0]} space (Fonov et al., 2009), by an affine registration "
        f"in ANTs (antspyx {versions['antspyx']}; Avants et al., 2011; Mattes mutual "
        f"information at {_mm(register.REGISTRATION_MM)}) started {start}, then refined in "
        f"{register.REFINE_PASSES} more passes on the atlas grid; a registration whose head masks "
        f"overlapped with a Dice coefficient below {register.MIN_HEAD_DICE:g} was refused.",
        _exclusion_sentence(xmask_source),
        f"The atlas head surface and its face labels ({_listed(names)}) were mapped into the "
        "subject. For each label, the skin was searched along the surface normals in steps of "
        f"a third of the smallest voxel size: the inward bound was the "
        f"{_order(bracket.DIST_IN_FRAC)} of the inward distances over the label's "
        f"vertices, between {_mm(bracket.DIST_IN_MIN_MM)} and {_mm(bracket.DIST_IN_MAX_MM)}"
        f"{shallow_s}, the outward bound the {_order(bracket.DIST_OUT_FRAC)} of the outward "
        "ones, between "
        f"{_mm(bracket.DIST_OUT_MIN_MM)} and {_mm(bracket.DIST_OUT_MAX_MM)}{short_s}. The "
        "label bounds were blended across label borders (Gaussian, sigma "
        f"{_mm(bracket.BLEND_SIGMA_MM)}), the "
        f"template face was moved {_mm(bracket.FACE_OFFSET_MM)} outward and the nose "
        f"{_mm(bracket.NOSE_PULL_MM)} inward, each fading to zero at its edge, and the inward "
        f"shell stopped {_mm(bracket.XMASK_ROOM_MM)} short of the exclusion mask. The voxels "
        "swept by the template face moved along its normals to these bounds formed the face "
        "mask: tissue and air under the template face, tissue and air beyond it; voxels of the "
        "exclusion mask were removed from it.",
    ]
    if ripple:
        sentences.append(
            f"A radial ripple of amplitude {_mm(ripple_amp_mm)} and period "
            f"{_mm(ripple_period_mm)} was added to the template surface."
        )
    sentences += [
        _fill_sentence(seed, fill_const, stat_frame),
        f"The word {meta['watermark_text']} was embossed "
        f"{_mm(bracket.WATERMARK_MM)} on the template face, and the code {fill.CODE_TAG} was "
        f"written into {len(fill.CODE_TAG)} voxels at a corner of the volume, so that a defaced "
        "image can be recognised.",
    ]
    if other_contrasts:
        sentences.append(_other_sentence(regheader))
    text = " ".join(sentences)
    cited = [key for key in REFERENCES if key in text]
    return "\n".join([text, "", "References", *(f"- {REFERENCES[key]}" for key in cited)]) + "\n"
