"""QA pictures, the dist-to-face check, report.html (opened in headless Chromium), sidecars."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ALL_T1W_HEADS, HEADS_DIR, default_run
from PIL import Image

from mideface_nipype import __version__
from mideface_nipype.cli import mideface as cli
from mideface_nipype.reports import render, report
from mideface_nipype.utils import bids, io

#: Two full runs (shared with the session, see ``runcache``), name -> (head, options, sidecar):
#: a 2 mm IXI head stored PSR, named the BIDS way, with a sidecar, and the RAS int16 sample head
#: (the run test_engine makes of it).
RUNS = {
    "sub-01_T1w.nii.gz": (
        HEADS_DIR / "IXI014-HH-1236-T1_ds.nii.gz",
        ("--pics", "--no-samseg"),
        '{"RepetitionTime": 2.3}\n',
    ),
    "dcmqa.nii.gz": (HEADS_DIR / "dcmqa-xa30_T1w_2mm.nii.gz", ("--pics",), None),
}
#: Every real head (named, not globbed: without ../shared the tests skip saying why).
ALL_HEADS = sorted(HEADS_DIR / name for name in [*ALL_T1W_HEADS, "chris_PD.nii.gz"])
CHROMIUM = shutil.which("chromium")
#: Collects, once the page has loaded, how many pictures it has and which failed to load.
IMAGE_PROBE = (
    '<script>window.addEventListener("load", () => { const bad = [...document.images]'
    ".filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt); "
    "document.body.dataset.images = document.images.length; "
    'document.body.dataset.broken = bad.join(","); });</script>'
)


@pytest.fixture(scope="module")
def runs() -> dict[str, Path]:
    """``mideface --pics`` on both heads; the (read-only) output folder of each."""
    out = {}
    for name, (head, options, sidecar) in RUNS.items():
        bids_name = name if bids.is_bids_name(Path(name)) else None
        out[name] = default_run(head.name, *options, name=bids_name, sidecar=sidecar)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_pics_writes_pictures_surfaces_and_the_dist_to_face_check(runs, name):
    odir = runs[name]
    for picture in report.PICTURES:
        assert (odir / picture).stat().st_size > 20_000, picture
    with (
        Image.open(odir / "face-before.png") as before,
        Image.open(odir / "face-after.png") as after,
    ):
        assert before.size == after.size and before.size[0] > 4 * 200 and before.size[1] > 250
        assert np.any(np.asarray(before) != np.asarray(after))
    with Image.open(odir / "face-before+after.gif") as gif:
        assert gif.n_frames == 2 and gif.info["loop"] == 0
    surfaces = [nib.load(odir / f) for f in ("head.surf.gii", "head.defaced.surf.gii")]
    dist = nib.load(odir / "dist-to-face.func.gii").darrays[0].data
    assert len(dist) == len(surfaces[0].darrays[0].data) > 50_000
    stats = json.loads((odir / "stats.json").read_text())
    check = stats["pics"]["dist_to_face"]
    assert check["face_vertices"] == np.isfinite(dist).sum() > 3000
    # the defaced skin crosses the true face (the template is an average face) but mostly moved
    assert 0.0 < check["coincide_fraction"] < report.WARN_COINCIDE_FRACTION
    within = np.nan_to_num(dist, nan=np.inf) <= report.COINCIDE_MM
    assert 0 < within.sum() < np.isfinite(dist).sum() / 2
    assert stats["pics"]["seconds"] > 0


def assert_renders_differ_in_the_face_only(original_path: Path, odir: Path) -> None:
    """Side views of the skin before/after: the front sixth (face) changed, the back sixth
    (occiput) and the crown seen from the front did not. Also used by test_engine on every head."""
    original = io.load_volume(original_path)
    before, after = report.head_surfaces(
        io.first_frame(original),
        io.first_frame(io.load_volume(odir / "defaced.nii.gz")),
        original.affine,
    )
    views = report.render_pair(before, after, np.loadtxt(odir / "subject_to_atlas.txt"))
    for view, anterior_right in (("left", True), ("right", False)):
        pair = views[view]
        head = pair.before.hit | pair.after.hit
        changed = (pair.before.hit != pair.after.hit) | (
            np.abs(np.nan_to_num(pair.before.depth) - np.nan_to_num(pair.after.depth)) > 0.5
        )
        cols = np.flatnonzero(head.any(axis=0))
        part = (cols[-1] - cols[0]) // 6  # the front sixth is face, the back sixth occiput
        face = slice(cols[-1] - part, None) if anterior_right else slice(None, cols[0] + part)
        back = slice(None, cols[0] + part) if anterior_right else slice(cols[-1] - part, None)
        assert changed[:, face][head[:, face]].mean() > 0.3, view
        assert changed[:, back][head[:, back]].mean() < 0.001, view
    front = views["front"]
    rows = np.flatnonzero(front.before.hit.any(axis=1))
    crown = slice(rows[0], rows[0] + (rows[-1] - rows[0]) // 6)
    assert np.allclose(
        front.before.depth[crown], front.after.depth[crown], atol=1e-6, equal_nan=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_renders_differ_in_the_face_and_not_at_the_back_of_the_head(runs, name):
    assert_renders_differ_in_the_face_only(RUNS[name][0], runs[name])


@pytest.mark.slow
def test_report_lists_everything_and_warns_only_when_needed(runs):
    for name, odir in runs.items():
        text = (odir / "report.html").read_text()
        for picture in report.PICTURES:
            assert f'alt="{picture}"' in text
        assert text.count('src="data:image/') == len(report.PICTURES)
        for word in ("Dist-to-face", "Timings", "Options", "Versions", "head_dice", __version__):
            assert word in text
        assert 'Warnings</h2>\n<p class="ok">none' in text, name  # whole faces, good registration
    stats = json.loads((runs["dcmqa.nii.gz"] / "stats.json").read_text())
    mask_img = nib.load(runs["dcmqa.nii.gz"] / "face.mask.nii.gz")
    mask = np.asarray(mask_img.dataobj).copy()
    assert report.qa_warnings(stats, mask, mask_img.affine) == []
    mask[:, -1, :] = 1  # face tissue all along the anterior edge of the box
    stats["registration"]["head_dice"] = 0.8
    stats["pics"]["dist_to_face"]["coincide_fraction"] = 0.9
    found = report.qa_warnings(stats, mask, mask_img.affine)
    assert [w.split(":")[0] for w in found[:2]] == [
        "face cut by the field of view",
        "low registration quality",
    ]
    assert "90.0 %" in found[2]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_opens_in_headless_chromium_with_every_picture(runs, tmp_path):
    page = tmp_path / "report.html"
    html = (runs["dcmqa.nii.gz"] / "report.html").read_text()
    page.write_text(html.replace("</body>", IMAGE_PROBE + "</body>"))
    shot = Path(__file__).resolve().parents[1] / "test-artifacts" / "report-screenshot.png"
    shot.parent.mkdir(exist_ok=True)
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    proc = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1400,2400", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.shape == (2400, 1400) and pixels.std() > 20  # text and renders, not blank
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, timeout=120)
    assert dom.returncode == 0
    body = dom.stdout.decode()
    assert f'data-images="{len(report.PICTURES)}"' in body and 'data-broken=""' in body


@pytest.mark.slow
def test_bids_named_input_gets_a_sidecar_and_every_output_names_the_tool(runs, tmp_path):
    odir = runs["sub-01_T1w.nii.gz"]
    sidecar = json.loads((odir / "defaced.json").read_text())
    assert sidecar["RepetitionTime"] == 2.3  # the source's metadata is kept
    record = sidecar["Defacing"]
    assert record["Tool"] == "mideface-nipype" and record["Version"] == __version__
    assert record["FaceMask"] == "face.mask.nii.gz" and record["Options"]["pics"] is True
    assert record["Source"].endswith("sub-01_T1w.nii.gz")
    assert not (runs["dcmqa.nii.gz"] / "defaced.json").exists()  # not a BIDS name
    descrip = nib.load(odir / "defaced.nii.gz").header["descrip"].tobytes().decode()
    assert descrip.startswith(f"defaced by mideface-nipype {__version__}")
    # FreeSurfer's --apply mode too
    source = odir.parent / "in" / "sub-01_T1w.nii.gz"
    out = tmp_path / "apply" / "sub-01_T1w.nii.gz"
    mask = odir / "face.mask.nii.gz"
    assert cli.main(["--apply", str(source), str(mask), "regheader", str(out)]) == 0
    record = json.loads((out.parent / "sub-01_T1w.json").read_text())["Defacing"]
    assert (
        record["FaceMask"] == str(mask.resolve()) and record["Options"]["apply"][2] == "regheader"
    )


def test_sidecar_merges_an_existing_one(tmp_path):
    image = tmp_path / "sub-02_ses-1_T2w.nii.gz"
    assert bids.is_bids_name(image) and not bids.is_bids_name(tmp_path / "T1.nii.gz")
    (tmp_path / "sub-02_ses-1_T2w.json").write_text('{"EchoTime": 0.1, "Description": "raw"}')
    text = report.sidecar_text(image, options={"seed": 7}, face_mask_path="/elsewhere/m.nii")
    meta = json.loads(text)
    assert list(meta) == ["EchoTime", "Description", "Defacing"]  # the one sidecar schema
    assert meta["EchoTime"] == 0.1 and meta["Description"] == report.DEFACED_DESCRIPTION
    assert meta["Defacing"]["FaceMask"] == "/elsewhere/m.nii"
    assert meta["Defacing"]["Options"] == {"seed": 7}


def test_stats_sections_are_named_once_and_kept_in_order():
    """``stats.json`` from records by section name: the schema's order whatever the order
    given, the per-contrast sections as lists, the seconds totalled, an unknown name refused."""
    records = {
        "pics": {"seconds": 0.25},
        "apply": [{"in_file": "a", "seconds": 1.5}, {"in_file": "b", "seconds": 0.5}],
        "head_mask": {"seconds": 1.0, "head_ml": 3000.0},
        "registration": {"seconds": 2.0, "head_dice": 0.95},
    }
    stats = report.collect_stats(records)
    assert list(stats) == [
        "mideface_nipype_version",
        "head_mask",
        "registration",
        "apply",
        "pics",
        "seconds_total",
    ]
    assert stats["seconds_total"] == 5.25 and stats["apply"][1]["in_file"] == "b"
    assert set(report.STATS_SECTIONS) >= set(records) and report.PER_IMAGE_SECTIONS == (
        "coregister",
        "apply",
    )
    with pytest.raises(ValueError, match="unknown stats.json sections"):
        report.collect_stats({"fills": {}})


def test_pics_without_odir_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    code = cli.main(["--i", str(RUNS["dcmqa.nii.gz"][0]), "--o", str(out), "--pics"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--pics needs --odir" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("head", ALL_HEADS, ids=lambda p: p.name.split(".")[0])
def test_pictures_of_every_original_head(head):
    """Skin, renders, distances and slices on each real head (scanner pose, no defacing)."""
    img = io.load_volume(head)
    data = io.first_frame(img)
    mesh, same = report.head_surfaces(data, data, img.affine)
    assert np.array_equal(mesh.vertices, same.vertices) and mesh.is_watertight
    # a skin copy 2 mm above: every distance from the original is at most 2 mm
    lifted = same.copy()
    lifted.apply_translation([0, 0, 2.0])
    i, j, k = np.ogrid[tuple(slice(0, n) for n in img.shape[:3])]
    world_a = img.affine[1, 0] * i + img.affine[1, 1] * j + img.affine[1, 2] * k
    face = (world_a > world_a.mean()).astype(np.uint8)  # the anterior half of the box
    dist = report.dist_to_face(mesh, lifted, face, img.affine)
    inside = np.isfinite(dist)
    assert inside.mean() > 0.2 and dist[inside].max() <= 2.0 + 1e-6
    assert np.median(dist[inside]) > 0.5
    check = report.coincidence(
        report.dist_to_face(mesh, same, face, img.affine), np.ones(len(dist))
    )
    assert check["coincide_fraction"] == 1.0 and check["median_dist_mm"] == 0.0
    views = report.render_pair(mesh, same, np.eye(4))
    for view, pair in views.items():
        assert np.array_equal(pair.before.depth, pair.after.depth, equal_nan=True), view
        assert 0.2 < pair.before.hit.mean() < 0.95, view
    # the face (whatever the field of view kept of it) is towards the front-view camera: the
    # nearest skin is the nose or brow, near the midline, not the side of the head
    front = views["front"].before
    cols = np.flatnonzero(front.hit.any(axis=0))
    nearest = np.unravel_index(np.nanargmax(front.depth), front.depth.shape)
    assert abs(nearest[1] - cols.mean()) < 0.2 * (cols[-1] - cols[0])
    # left and right views see mirror-image silhouettes of the same head
    hits = [views[v].before.hit.sum() for v in ("left", "right")]
    assert abs(hits[0] - hits[1]) < 0.05 * max(hits)
    slices = report.outlined_slices([data], face, face, img.affine)
    assert slices.ndim == 3 and slices.shape[2] == 3 and min(slices.shape[:2]) > 60
    assert np.any(np.all(slices == report.XMASK_RGB, axis=2))
    assert render.VIEWS_DEG.keys() == views.keys()
