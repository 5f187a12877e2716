"""The citable methods paragraph: it names the run's options and versions, and follows them."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from mideface_nipype import __version__
from mideface_nipype.engine import atlas, bracket, exclusion, fill, register
from mideface_nipype.reports.methods import REFERENCES, methods_text

VERSIONS = {"nipype": "9.8.7", "nibabel": "6.5.4", "antspyx": "3.2.1"}


def paragraph(**options) -> str:
    """The methods paragraph alone (without the references)."""
    return methods_text(versions=VERSIONS, **options).split("\nReferences\n")[0]


def references(**options) -> list[str]:
    return methods_text(versions=VERSIONS, **options).split("\nReferences\n")[1].splitlines()


def test_defaults_name_versions_engine_values_and_references():
    text = paragraph()
    assert f"mideface-nipype {__version__}" in text
    for name, version in VERSIONS.items():
        assert version in text, name
    # the engine's defaults, as its modules define them
    assert f"seed {fill.DEFAULT_SEED}." in text
    assert f"{100 * bracket.DIST_IN_FRAC:g}th percentile" in text
    assert f"between {bracket.DIST_IN_MIN_MM:g} mm and {bracket.DIST_IN_MAX_MM:g} mm" in text
    assert f"between {bracket.DIST_OUT_MIN_MM:g} mm and {bracket.DIST_OUT_MAX_MM:g} mm" in text
    assert f"sigma {bracket.BLEND_SIGMA_MM:g} mm" in text
    assert f"moved {bracket.FACE_OFFSET_MM:g} mm outward" in text
    assert f"{bracket.XMASK_ROOM_MM:g} mm short of the exclusion mask" in text
    assert f"at {register.REGISTRATION_MM:g} mm" in text
    assert fill.CODE_TAG in text
    # default labels: face and ears, the ears' shallow inward bound; no forehead
    assert "lower face, upper face, nose, eyes, ear left and ear right" in text
    assert "ear left and ear right: at most 3 mm" in text
    assert f"lower face: at most {bracket.LOWER_FACE_DIST_OUT_MAX_MM:g} mm" in text
    assert "forehead" not in text and "back of head" not in text
    # the default exclusion mask comes from the segmentation, cited
    assert exclusion.DEFAULT_XMASK_SOURCE == "segment" and "SAMSEG" in text
    assert "ripple" not in text and "other images" not in text
    cited = references()
    assert len(cited) == len(REFERENCES)
    for author in ("Greve DN", "Avants BB", "Gorgolewski K", "Brett M", "Puonti O", "Fonov VS"):
        assert sum(line.startswith(f"- {author}") for line in cited) == 1, author


def test_versions_default_to_the_installed_ones():
    from mideface_nipype.reports.report import versions

    text = methods_text()
    assert f"Nipype {versions()['nipype']} workflow" in text
    assert f"NiBabel {versions()['nibabel']}" in text


def test_text_follows_the_options():
    default = paragraph()
    seeded = paragraph(seed=7)
    assert "seed 7." in seeded and f"seed {fill.DEFAULT_SEED}." not in seeded

    const = paragraph(fill_const=(0.0, -12.5))
    assert "set to 0 under the template face and 12.5 beyond it" in const
    assert "noise" not in const and "seed" not in const

    frame = paragraph(stat_frame=2)
    assert "measured in frame 2" in frame and "frame" not in default

    labels = paragraph(ears=False, forehead=True, back_of_head=True)
    assert "lower face, upper face, nose, eyes, forehead and back of head" in labels
    assert "forehead and back of head: at most 3 mm" in labels
    assert not re.search(r"\bears?\b", labels)

    rippled = paragraph(ripple=True, ripple_amp_mm=2.5, ripple_period_mm=40.0)
    assert "ripple of amplitude 2.5 mm and period 40 mm" in rippled

    started = paragraph(init_transform=True)
    assert "from a transform supplied by the user" in started
    assert "axis rotations" not in started and "axis rotations" in default

    others = paragraph(other_contrasts=True)
    assert "rigidly registered to the reference image" in others
    same_space = paragraph(other_contrasts=True, regheader=True)
    assert "scanner space of the reference image" in same_space
    assert "rigidly" not in same_space


@pytest.mark.parametrize(
    ("source", "says", "cites_samseg"),
    [
        ("segment", "contrast-adaptive Bayesian segmentation", True),
        ("atlas", "The brain and eyes of the atlas tissue priors (probability above 0.5)", False),
        ("user", "An exclusion mask supplied by the user", False),
    ],
)
def test_exclusion_mask_source(source, says, cites_samseg):
    text = methods_text(versions=VERSIONS, xmask_source=source)
    assert says in text
    assert ("Puonti" in text) is cites_samseg
    assert "- Puonti O" in text if cites_samseg else "Puonti" not in text


def test_unknown_exclusion_source_is_refused():
    with pytest.raises(ValueError, match="xmask_source must be one of"):
        methods_text(versions=VERSIONS, xmask_source="synthseg")


def test_atlas_folder_is_read(tmp_path):
    """Another atlas folder: the text names it and takes its space and watermark from it."""
    custom = tmp_path / "my-atlas"
    shutil.copytree(atlas.atlas_dir(), custom)
    meta = json.loads((custom / atlas.META_FILE).read_text())
    meta.update(space="Colin27 (my build)", watermark_text="ANON")
    (custom / atlas.META_FILE).write_text(json.dumps(meta))
    text = paragraph(atlas_dir=str(custom))
    assert f"the face atlas in {custom}" in text
    assert "in Colin27 space" in text and "The word ANON was embossed" in text
    assert "MNI152" not in text


def test_the_graph_carries_the_paragraph_into_the_report():
    """``init_mideface_wf`` sets ``__desc__`` from its own arguments and report.html shows it."""
    from mideface_nipype.reports.report import report_html
    from mideface_nipype.workflows.base import init_mideface_wf

    workflow = init_mideface_wf(seed=7, forehead=True)
    assert workflow.__desc__ == methods_text(seed=7, forehead=True)
    assert workflow.get_node("report").inputs.methods == workflow.__desc__
    page = report_html(title="t", stats={}, options={}, warnings=[], methods=workflow.__desc__)
    section = page.split("<h2>Methods</h2>", 1)[1]
    assert "with seed 7." in section.split("</p>", 1)[0]
    cited = workflow.__desc__.split("\nReferences\n")[1].splitlines()
    assert section.count("<li>") == len(cited) > 0
