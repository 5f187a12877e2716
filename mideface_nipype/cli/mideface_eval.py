"""mideface-eval: mideface-nipype and its peers on a set of real heads, one results table.

    mideface-eval HEAD... --out DIR [--methods METHOD...] [--seed N...] [--sources DIR]
                  [--no-tissue]

For every head: the intact renders (gallery and control probes), then for every method the
defaced head made by the method as a whole process (wall time, peak memory), its renders, the
renders after the refacing attacks, voxels changed inside the independent brain mask, and tissue
volumes before vs after (Atropos in the original's brain mask) and the brain-mask volume
estimated anew on the defaced image. Per-head results are kept in DIR/subjects/ (a rerun
reuses them), the defaced heads in DIR/defaced/METHOD/ (DIR/defaced/METHOD-seedN/ for mideface's
further noise seeds, whose probes its rows pool); the table is written to
DIR/results.md and the figures to DIR/results.json. Needs the eval extra
(pip install 'mideface-nipype[eval]').
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Sequence
from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np

from mideface_nipype.engine.fill import DEFAULT_SEED
from mideface_nipype.evaluation import metrics
from mideface_nipype.evaluation.peers import PEERS
from mideface_nipype.utils import io

#: mideface as a defacer: its defaults, and with the optional forehead label (where most of
#: the identity left by the defaults sits): the options each adds to ``mideface --i --o``.
MIDEFACE_METHODS = {"mideface": (), "mideface-forehead": ("--forehead",)}
METHODS = (*MIDEFACE_METHODS, *PEERS)
#: Compared unless ``--methods`` says otherwise.
DEFAULT_METHODS = ("mideface", *PEERS)
#: The defaced image and the refacing attacks on it.
VARIANTS = ("defaced", "median", "smooth")
#: Shown in the table next to each method's name.
METHOD_NOTES = {
    "mideface": "mideface-nipype (`mideface --i IN --o OUT`, defaults)",
    "mideface-forehead": "mideface-nipype (`mideface --i IN --o OUT --forehead`)",
    "quickshear": "quickshear 1.2 (PyPI), independent brain mask",
    "pydeface-ants": "pydeface 2.1 method: its template + face mask, ANTs affine (no FSL here)",
}
#: Key of the gallery view in the per-head arrays.
GALLERY_KEY = f"{metrics.GALLERY_YAW_DEG:g}"
#: Key of a head's own face labels in its frontal renders (``metrics.subject_face_region``).
FACE_REGION_KEY = "intact/face_region"
#: Version of the per-head records: a cached record of another version is made again.
RECORD_FORMAT = 7
#: The default atlas sources beside a checkout (``../shared/data/atlas-sources``).
DEFAULT_SOURCES = Path(__file__).resolve().parents[3] / "shared" / "data" / "atlas-sources"


def defacer_command(
    method: str, head: Path, out: Path, brain_mask: Path, seed: int = DEFAULT_SEED
) -> list[str]:
    """The whole process that defaces ``head`` into ``out`` with ``method`` (mideface with the
    noise ``seed``: its default unless another one is asked for)."""
    if method in MIDEFACE_METHODS:
        cli = [sys.executable, "-m", "mideface_nipype.cli.mideface", "--force"]
        seeded = [] if seed == DEFAULT_SEED else ["--seed", str(seed)]
        return [*cli, "--i", str(head), "--o", str(out), *MIDEFACE_METHODS[method], *seeded]
    cmd = [sys.executable, "-m", "mideface_nipype.evaluation.peers", method, str(head), str(out)]
    return [*cmd, "--brain-mask", str(brain_mask)] if method == "quickshear" else cmd


def method_runs(
    methods: tuple[str, ...], seeds: tuple[int, ...] = (DEFAULT_SEED,)
) -> dict[str, tuple[str, int]]:
    """Each defacing to run on a head, by its name: (method, mideface's noise seed).

    A method's first run carries the method's name; mideface runs again for every further seed
    (``METHOD-seedN``), since its fill is random by design and a count from one noise draw moves
    by about two probes in 21. The peers have no noise: one run each."""
    runs = {method: (method, seeds[0]) for method in methods}
    for method in methods:
        if method in MIDEFACE_METHODS:
            runs |= {f"{method}-seed{seed}": (method, seed) for seed in seeds[1:]}
    return runs


def runs_of(method: str, runs: dict[str, tuple[str, int]]) -> list[str]:
    """The names of ``method``'s runs, its first run first: their probes are pooled."""
    return [run for run, (of, _) in runs.items() if of == method]


def head_outputs(head: Path, out_dir: Path, runs: Iterable[str]) -> dict[str, Path]:
    """The files mideface-eval writes for one head: brain mask, cache, one defaced per run
    (``method_runs``)."""
    stem = _stem(head)
    files = {
        "brain": out_dir / "brain" / f"{stem}.nii.gz",
        "json": out_dir / "subjects" / f"{stem}.json",
        "npz": out_dir / "subjects" / f"{stem}.npz",
    }
    return files | {run: out_dir / "defaced" / run / f"{stem}.nii.gz" for run in runs}


def _stem(head: Path) -> str:
    """The file name without its volume suffix (outputs never go beside the inputs)."""
    return io.split_suffix(Path(head).name)[0]


def _faces(views: dict, regions: dict, part: str | None = None) -> dict:
    """Descriptors, detection flags and detector scores of renders, keyed by yaw (``regions``:
    the head's own face labels per yaw, the box where no face is detected); with ``part``,
    of that part of each render alone (``metrics.part_picture``)."""
    out = {}
    for yaw, rend in views.items():
        picture = rend.rgb()
        if part is not None:
            picture = metrics.part_picture(picture, regions[yaw], part)
        face = metrics.describe_face(picture, regions[yaw])
        out[yaw] = (face.descriptor, face.detected, face.score)
    return out


def _pack(prefix: str, faces: dict, depth: np.ndarray | None = None) -> dict[str, np.ndarray]:
    arrays = {} if depth is None else {f"{prefix}/depth": depth.astype(np.float32)}
    for yaw, (desc, detected, score) in faces.items():
        arrays[f"{prefix}/{yaw:g}/descriptor"] = desc
        arrays[f"{prefix}/{yaw:g}/detected"] = np.array(detected)
        arrays[f"{prefix}/{yaw:g}/score"] = np.array(score)
    return arrays


def _pack_parts(prefix: str, views: dict, regions: dict) -> dict[str, np.ndarray]:
    """Descriptors of each part of the renders alone (``metrics.RENDER_PARTS``), under
    ``PREFIX/only-PART``."""
    arrays = {}
    for part in metrics.RENDER_PARTS:
        arrays.update(_pack(f"{prefix}/only-{part}", _faces(views, regions, part)))
    return arrays


def _pack_skin(prefix: str, points: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """The 3-D attacker's skin points: outside the face (aligned) and the face (compared)."""
    return {f"{prefix}/skin_rest": points[0], f"{prefix}/skin_face": points[1]}


def evaluate_head(
    head: Path,
    out_dir: Path,
    methods: tuple[str, ...],
    sources: Path,
    tissue: bool,
    publisher: io.Publisher,
    seeds: tuple[int, ...] = (DEFAULT_SEED,),
) -> tuple[dict, dict[str, np.ndarray]]:
    """All measurements of one head: a JSON-able record and the arrays (descriptors, depth).

    Files go through ``publisher`` (never onto an input); the defacers' outputs are checked by
    it before each defacer runs. ``seeds`` are mideface's noise seeds (kept in the record): one
    run per seed (``method_runs``), the tissue and the eICV of the first run only."""
    img = io.load_volume(head)
    data = io.first_frame(img)
    subject_to_atlas = metrics.atlas_affine(img)
    to_atlas = metrics.align_to_atlas(img, subject_to_atlas)
    brain = metrics.independent_brain_mask(img, sources, subject_to_atlas)
    runs = method_runs(methods, seeds)
    files = head_outputs(head, out_dir, runs)
    brain_file = publisher.save_volume(io.mask_image(brain, img), files["brain"])
    views = metrics.render_views(data, img.affine, to_atlas)
    regions = {
        yaw: metrics.subject_face_region(subject_to_atlas, to_atlas, yaw)
        for yaw in metrics.PROBE_YAWS_DEG
    }
    arrays = _pack("intact", _faces(views, regions), views[metrics.GALLERY_YAW_DEG].depth)
    arrays[FACE_REGION_KEY] = regions[metrics.GALLERY_YAW_DEG]
    arrays.update(_pack_parts("intact", views, regions))
    arrays.update(
        _pack_skin("intact", metrics.skin_points(data, img.affine, to_atlas, subject_to_atlas))
    )
    record: dict = {
        "head": head.name,
        "format": RECORD_FORMAT,
        "brain_ml": _ml(brain, img),
        "seeds": list(seeds),
        "methods": {},
    }
    before = metrics.tissue_volumes_ml(img, brain) if tissue else None
    record["tissue_ml"] = before
    if tissue:  # the eICV's original: its mask by ``EICV_TRANSFORM``, as its defaced images'
        eicv = metrics.independent_brain_mask(
            img, sources, subject_to_atlas, transform=metrics.EICV_TRANSFORM
        )
        record["eicv_ml"] = _ml(eicv, img)
    for run, (method, seed) in runs.items():
        out = publisher.check(files[run])
        entry: dict = {}
        record["methods"][run] = entry
        try:
            wall, peak_gb = metrics.run_measured(
                defacer_command(method, head, out, brain_file, seed=seed)
            )
        except RuntimeError as err:
            entry["error"] = str(err)
            continue
        entry.update(seconds=wall, peak_gb=peak_gb)
        dimg = nib.load(out)
        ddata = io.first_frame(dimg)
        entry["brain_voxels_changed"] = metrics.voxels_changed(data, ddata, brain)
        entry["voxels_changed"] = metrics.voxels_changed(data, ddata, np.ones_like(brain))
        if tissue and run == method:
            entry["tissue_ml"] = metrics.tissue_volumes_ml(dimg, brain)
            entry["tissue_change_pct"] = metrics.percent_change(before, entry["tissue_ml"])
            # the eICV analog: the brain mask again on the defaced image, from the original's start
            brain_again = metrics.independent_brain_mask(
                dimg, sources, subject_to_atlas, transform=metrics.EICV_TRANSFORM
            )
            entry["brain_ml"] = _ml(brain_again, dimg)
            entry["brain_ml_change_pct"] = metrics.percent_change(
                {"brain": record["eicv_ml"]}, {"brain": entry["brain_ml"]}
            )["brain"]
        arrays.update(
            _pack_skin(
                f"{run}/defaced",
                metrics.skin_points(ddata, dimg.affine, to_atlas, subject_to_atlas),
            )
        )
        volumes = {"defaced": ddata, **metrics.refacing_attacks(ddata, dimg.affine)}
        for variant in VARIANTS:
            vviews = metrics.render_views(volumes[variant], dimg.affine, to_atlas)
            arrays.update(
                _pack(
                    f"{run}/{variant}",
                    _faces(vviews, regions),
                    vviews[metrics.GALLERY_YAW_DEG].depth,
                )
            )
            if variant == "defaced":
                arrays.update(_pack_parts(run, vviews, regions))
    return record, arrays


def _ml(mask: np.ndarray, img: nib.spatialimages.SpatialImage) -> float:
    return float(np.count_nonzero(mask) * abs(np.linalg.det(img.affine[:3, :3])) / 1000.0)


def _prefixes(prefix: str | Sequence[str]) -> list[str]:
    """One kind of probe: one prefix, or several pooled (the runs of one method)."""
    return [prefix] if isinstance(prefix, str) else list(prefix)


def _probes(
    arrays: list[dict], prefix: str | Sequence[str], yaws
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descriptors, true gallery index and detection flags of one kind of probe, all subjects
    (of every prefix, pooled)."""
    desc, truth, detected = [], [], []
    for run in _prefixes(prefix):
        for i, arr in enumerate(arrays):
            for yaw in yaws:
                key = f"{run}/{yaw:g}"
                if f"{key}/descriptor" in arr:
                    desc.append(arr[f"{key}/descriptor"])
                    truth.append(i)
                    detected.append(bool(arr[f"{key}/detected"]))
    return np.array(desc).reshape(-1, 128), np.array(truth, dtype=int), np.array(detected)


def identification(
    arrays: list[dict], prefix: str | Sequence[str], yaws, gallery_prefix: str = "intact"
) -> dict:
    """Rank-1 identification and detection of ``prefix`` probes (several prefixes: their probes
    pooled) against the gallery (the ``gallery_prefix`` frontal renders: the intact heads, or
    one part of them)."""
    if not arrays:
        return {"probes": 0}
    gallery = np.stack([a[f"{gallery_prefix}/{GALLERY_KEY}/descriptor"] for a in arrays])
    desc, truth, detected = _probes(arrays, prefix, yaws)
    if len(truth) == 0:
        return {"probes": 0}
    distances = metrics.descriptor_distances(desc, gallery)
    ranks = metrics.rank_of_truth(distances, truth)
    discounted = metrics.rank_of_truth(metrics.hub_discounted(distances), truth)
    return {
        "probes": int(len(truth)),
        "rank1": int(np.count_nonzero(ranks == 1)),
        "detected": int(np.count_nonzero(detected)),
        "ranks": ranks.tolist(),
        # how many of each person's own probes rank them first (a third is the issue's limit)
        "rank1_per_person": np.bincount(truth[ranks == 1], minlength=len(arrays)).tolist(),
        "probes_per_person": np.bincount(truth, minlength=len(arrays)).tolist(),
        # how many probes (anyone's) have each gallery face nearest: a hub draws many
        "nearest_counts": np.bincount(distances.argmin(1), minlength=len(arrays)).tolist(),
        # the attacker who discounts hub faces (``metrics.hub_discounted``)
        "rank1_hub_discounted": int(np.count_nonzero(discounted == 1)),
        "rank1_hub_discounted_per_person": np.bincount(
            truth[discounted == 1], minlength=len(arrays)
        ).tolist(),
    }


def _by_correlation(corr: np.ndarray, have: list[int]) -> dict:
    """Rank-1 identification by r (probes ``have``, gallery all heads; a missing r ranks last)
    and each probe's r with its own original."""
    ranks = metrics.rank_of_truth(-np.nan_to_num(corr, nan=-1.0), np.array(have))
    return {
        "own_r": [float(corr[k, i]) for k, i in enumerate(have)],
        "rank1": int(np.count_nonzero(ranks == 1)),
        "probes": len(have),
    }


def _have(arrays: list[dict], prefix: str | Sequence[str], key: str) -> list[tuple[int, str]]:
    """(head, prefix) of every probe that has ``PREFIX/key``, every prefix pooled."""
    return [
        (i, run) for run in _prefixes(prefix) for i, a in enumerate(arrays) if f"{run}/{key}" in a
    ]


def depth_measures(arrays: list[dict], prefix: str | Sequence[str]) -> dict:
    """Depth correlation with the own original and depth-map rank-1 identification, over each
    probe head's own face labels (what the defacer replaced); and rank-1 over the rest of the
    frontal view (the identity a defacer leaves outside the face labels). Several prefixes:
    their probes pooled."""
    intact = [a["intact/depth"] for a in arrays]
    have = _have(arrays, prefix, "depth")
    if not have:
        return {}

    def correlations(in_labels: bool) -> np.ndarray:
        """(probes, gallery) r over each probe head's own face labels, or the rest of its view."""
        return np.array(
            [
                [
                    metrics.depth_correlation(
                        arrays[i][f"{run}/depth"],
                        g,
                        arrays[i][FACE_REGION_KEY] if in_labels else ~arrays[i][FACE_REGION_KEY],
                    )
                    for g in intact
                ]
                for i, run in have
            ]
        )

    truth = [i for i, _ in have]
    out = _by_correlation(correlations(True), truth)
    out["rank1_outside"] = _by_correlation(correlations(False), truth)["rank1"]
    return out


def icp_depth_measures(arrays: list[dict], prefix: str | Sequence[str]) -> dict:
    """The 3-D attacker: each ``prefix`` head aligned to every intact head by rigid ICP of the
    skin outside the face labels, then face depth maps compared (Pearson r); rank-1, r with the
    own original, and r between different intact people aligned the same way. Several
    prefixes: their probes pooled."""
    have = _have(arrays, prefix, "skin_rest")
    if not have or any("intact/skin_rest" not in a for a in arrays):
        return {}
    gallery = [(a["intact/skin_rest"], a["intact/skin_face"]) for a in arrays]
    probes = [(arrays[i][f"{run}/skin_rest"], arrays[i][f"{run}/skin_face"]) for i, run in have]
    out = _by_correlation(metrics.icp_depth_correlations(probes, gallery), [i for i, _ in have])
    if prefix == "intact":
        return out
    between = metrics.icp_depth_correlations(gallery, gallery)
    out["between_r"] = between[~np.eye(len(gallery), dtype=bool)].tolist()
    return out


def between_people_r(arrays: list[dict]) -> list[float]:
    """Depth correlation of intact frontal renders of different people over the first one's own
    face labels (as ``depth_measures`` compares a probe with the gallery), every ordered pair."""
    intact = [a["intact/depth"] for a in arrays]
    return [
        metrics.depth_correlation(intact[i], intact[j], arrays[i][FACE_REGION_KEY])
        for i in range(len(intact))
        for j in range(len(intact))
        if i != j
    ]


def _parts(arrays: list[dict], prefix: str | Sequence[str], yaws) -> dict:
    """Identification by each part of the renders alone, against the same part of the intact
    frontal renders (the attacker who paints the rest black in both); a head the method failed
    on has no probes, as in ``identification``."""
    return {
        part: identification(
            arrays, [f"{run}/only-{part}" for run in _prefixes(prefix)], yaws, f"intact/only-{part}"
        )
        for part in metrics.RENDER_PARTS
    }


def summarise(
    records: list[dict],
    arrays: list[dict],
    methods: tuple[str, ...],
    seeds: tuple[int, ...] = (DEFAULT_SEED,),
) -> dict:
    """The figures of the table, per method, from all heads' records and arrays.

    Privacy is measured on the heads whose intact frontal render holds a detected face (a face
    cut by the field of view cannot be recognised before defacing either); brain and cost on all.
    A method run with several noise seeds (``method_runs``) pools the probes of all its runs;
    its brain voxels changed are summed over them.
    """
    runs = method_runs(methods, seeds)
    with_face = [i for i, a in enumerate(arrays) if bool(a[f"intact/{GALLERY_KEY}/detected"])]
    faces = [arrays[i] for i in with_face]
    summary = {
        "heads": [r["head"] for r in records],
        "face_heads": [records[i]["head"] for i in with_face],
        "chance_rank1": 1.0 / max(len(faces), 1),
        "control": identification(faces, "intact", metrics.CONTROL_YAWS_DEG),
        "control_parts": _parts(faces, "intact", metrics.CONTROL_YAWS_DEG),
        "between_people_r": between_people_r(faces),
        "seeds": list(seeds),
        "methods": {},
    }
    for method in methods:
        pooled = runs_of(method, runs)
        # (record, entry) of every run of the method on every head
        pairs = [(r, r["methods"].get(run, {})) for run in pooled for r in records]
        entries = [e for _, e in pairs]
        ok = [e for e in entries if "error" not in e and e]
        row: dict = {
            "runs": pooled,
            "errors": [f"{r['head']}: {e['error']}" for r, e in pairs if "error" in e],
        }
        defaced = [f"{run}/defaced" for run in pooled]
        for variant in VARIANTS:
            row[variant] = identification(
                faces, [f"{run}/{variant}" for run in pooled], metrics.PROBE_YAWS_DEG
            )
        row["parts"] = _parts(faces, pooled, metrics.PROBE_YAWS_DEG)
        row["depth"] = depth_measures(faces, defaced)
        row["icp_depth"] = icp_depth_measures(faces, defaced)
        if ok:
            row["brain_voxels_changed"] = int(sum(e["brain_voxels_changed"] for e in ok))
            row["seconds_median"] = statistics.median(e["seconds"] for e in ok)
            row["peak_gb_max"] = max(e["peak_gb"] for e in ok)
            changes = [e["tissue_change_pct"] for e in ok if "tissue_change_pct" in e]
            if changes:
                row["tissue_change_pct_max_abs"] = {
                    k: max(abs(c[k]) for c in changes) for k in changes[0]
                }
                # the same changes in % of the brain: a small class does not inflate them
                row["tissue_change_pct_of_brain_max_abs"] = max(
                    100.0 * abs(e["tissue_ml"][k] - r["tissue_ml"][k]) / r["brain_ml"]
                    for r, e in pairs
                    if "tissue_ml" in e
                    for k in metrics.TISSUES
                )
            brain_changes = [e["brain_ml_change_pct"] for e in ok if "brain_ml_change_pct" in e]
            if brain_changes:
                row["brain_ml_change_pct_max_abs"] = max(map(abs, brain_changes))
        summary["methods"][method] = row
    return summary


def _rate(ident: dict, key: str = "rank1") -> str:
    if not ident.get("probes"):
        return "–"
    return f"{ident[key]}/{ident['probes']} ({100.0 * ident[key] / ident['probes']:.0f} %)"


def _worst_person(ident: dict, key: str = "rank1_per_person") -> str:
    """The person whose own probes were ranked first most often (by the attacker of ``key``):
    'k/n'."""
    if not ident.get(key):
        return "–"
    k = int(np.argmax(ident[key]))
    return f"{ident[key][k]}/{ident['probes_per_person'][k]}"


def _discounted(ident: dict) -> str:
    """Rank-1 of the hub-discounting attacker and its most own probes of one person: 'k/n (m/n)'."""
    if not ident.get("probes"):
        return "–"
    worst = _worst_person(ident, "rank1_hub_discounted_per_person")
    return f"{ident['rank1_hub_discounted']}/{ident['probes']} ({worst})"


def _by_part(parts: dict) -> str:
    """Rank-1 of the face labels alone / the rest alone, hub-discounted in brackets."""
    if not all(parts[p]["probes"] for p in metrics.RENDER_PARTS):
        return "–"
    raw = " / ".join(f"{parts[p]['rank1']}/{parts[p]['probes']}" for p in metrics.RENDER_PARTS)
    hub = " / ".join(str(parts[p]["rank1_hub_discounted"]) for p in metrics.RENDER_PARTS)
    return f"{raw} ({hub})"


def _method_note(method: str, summary: dict) -> str:
    """The method's cell: its note, with the noise seed when mideface ran with another one, or
    the seeds whose probes it pools."""
    seeds = summary.get("seeds", [DEFAULT_SEED])
    if method not in MIDEFACE_METHODS or seeds == [DEFAULT_SEED]:
        return METHOD_NOTES[method]
    if len(seeds) == 1:
        options = " ".join(("--i IN --o OUT", *MIDEFACE_METHODS[method], f"--seed {seeds[0]}"))
        return f"mideface-nipype (`mideface {options}`)"
    return METHOD_NOTES[method].removesuffix(")") + (
        f"; noise seeds {', '.join(map(str, seeds))}, their probes pooled)"
    )


def markdown_table(summary: dict) -> str:
    """The results table (Markdown) with the control, the chance level and the notes."""
    n = len(summary["face_heads"])
    no_face = sorted(set(summary["heads"]) - set(summary["face_heads"]))
    between = np.array(summary["between_people_r"])
    head = (
        "| method | rank-1 after defacing | after median filter | after smoothing | faces "
        "detected | most own probes ranked first (one person) | rank-1 by an attacker who "
        "discounts hub faces: after defacing / median / smoothing (most own probes) "
        "| rank-1 of one part of the render alone: the face labels / the rest of the view "
        "(hub-discounted) "
        "| depth rank-1 | depth r with own original (median) | depth rank-1 outside the face "
        "labels | 3-D attacker rank-1 (ICP of the skin outside the face) | its depth r own / "
        "between people (median) | brain voxels changed "
        "| tissue volume change, max \\|%\\| (GM / WM / CSF; any class in % of brain) "
        "| brain-mask volume change re-estimated on the defaced image, max \\|%\\| "
        "| s per subject (median) | GB per subject (peak) |"
    )
    rows = [head, "|" + "---|" * 18]
    control = summary["control"]
    between_s = (
        f"between people: {np.nanmedian(between):.3f} (max {np.nanmax(between):.3f})"
        if np.isfinite(between).any()
        else "–"
    )
    rows.append(
        f"| intact heads, ±30° probes (control) | {_rate(control)} | | | "
        f"{_rate(control, 'detected')} | {_worst_person(control)} | {_discounted(control)} | "
        f"{_by_part(summary['control_parts'])} | | {between_s} | | | | | | | | |"
    )
    for method, row in summary["methods"].items():
        tissue = row.get("tissue_change_pct_max_abs")
        tissue_s = (
            " / ".join(f"{tissue[k]:.2f}" for k in ("gm", "wm", "csf"))
            + f"; {row['tissue_change_pct_of_brain_max_abs']:.2f}"
            if tissue
            else "–"
        )
        brain_change = row.get("brain_ml_change_pct_max_abs")
        brain_s = f"{brain_change:.2f}" if brain_change is not None else "–"
        depth = row["depth"]
        own = f"{np.nanmedian(depth['own_r']):.3f}" if depth.get("own_r") else "–"
        depth_rank = _rate(depth) if depth else "–"
        outside = _rate(depth, "rank1_outside") if depth else "–"
        icp = row.get("icp_depth") or {}
        icp_rank = _rate(icp) if icp else "–"
        icp_r = (
            f"{np.nanmedian(icp['own_r']):.3f} / {np.nanmedian(icp['between_r']):.3f}"
            if icp.get("between_r")
            else "–"
        )
        worst = " / ".join(_worst_person(row[v]) for v in VARIANTS)
        discounted = " / ".join(_discounted(row[v]) for v in VARIANTS)
        parts = _by_part(row["parts"])
        note = _method_note(method, summary)
        rows.append(
            f"| {note} | {_rate(row['defaced'])} | {_rate(row['median'])} | "
            f"{_rate(row['smooth'])} | {_rate(row['defaced'], 'detected')} | {worst} | "
            f"{discounted} | {parts} | {depth_rank} | {own} | {outside} | {icp_rank} | {icp_r} | "
            f"{row.get('brain_voxels_changed', '–')} | {tissue_s} | {brain_s} | "
            f"{row.get('seconds_median', float('nan')):.1f} | "
            f"{row.get('peak_gb_max', float('nan')):.2f} |"
        )
    notes = [
        "",
        f"Brain, tissue and cost: {len(summary['heads'])} heads ({', '.join(summary['heads'])}). "
        f"Privacy: the {n} heads whose intact frontal render holds a detected face"
        + (f" (not {', '.join(no_face)}: no face detected intact)" if no_face else "")
        + f". Probes: renders at 0° and ±30° yaw, ranked against intact frontal renders of all {n} "
        f"subjects (dlib 128-d descriptors); chance rank-1 is 1/{n} = "
        f"{100 * summary['chance_rank1']:.0f} %"
        + (
            f"; mideface's rows pool the probes of its {len(summary['seeds'])} noise seeds "
            "(one defacing of every head per seed, "
            f"{len(metrics.PROBE_YAWS_DEG) * len(summary['seeds'])} probes per person; "
            "the tissue and brain-mask volumes are the first seed's)"
            if len(summary.get("seeds", [])) > 1
            else ""
        )
        + ". An attacker who holds all the probes of a "
        "kind discounts hub faces: each gallery face's mean distance to those probes is "
        "subtracted before ranking (an average-looking face is otherwise nearest to most "
        "defaced faces, its owner's included); most own probes ranked first: after defacing / "
        "median / smoothing. One part alone: the probe and every gallery face with all but "
        "that part painted black (the head's own face labels in its renders, or the rest of "
        "the view): identity read from the rest is what remains outside the face labels, the "
        "same for every defacer that leaves the rest. Depth: frontal depth maps (each head "
        "seen rigidly in the atlas "
        "pose, with its own proportions) over the probe head's own face labels as its "
        "registration places them, Pearson r, ranked like the descriptors; outside the face "
        "labels: the same over the rest of the frontal view (scalp, ears, neck: what every "
        "defacer here leaves). 3-D attacker: each defaced head aligned to every intact head by "
        "rigid ICP of the skin outside its own face labels (the part the defacer leaves), then "
        "the frontal depth map (1 mm) of its skin over those labels (within "
        f"{metrics.FACE_NEAR_MM:g} mm: what the defacer put there) correlated with theirs; "
        "between people: intact heads aligned to each other the same way. Independent brain "
        "mask: N4 + SyN of the "
        "MNI152 2009 SSW head from the engine's affine of the original, its metric on the "
        "template's brain and skull, ICBM 2009a brain. Tissue: N4 in the original's brain mask, "
        "then ANTs Atropos (3 classes, 2 mm) in it, as antsAtroposN4 and smriprep segment, the "
        "same mask before and after (a defacer that changes no brain voxel scores 0). Brain-mask "
        "volume: the independent brain mask estimated on the original and again on the defaced "
        f"image from the same start, by {metrics.EICV_TRANSFORM} (without SyN's affine stage, "
        "which flips between basins), the latter in % of the former (the eICV of the MiDeFace "
        "authors, -0.1 %).",
    ]
    for method, row in summary["methods"].items():
        notes += [f"{method} failed on {err}" for err in row["errors"]]
    return "\n".join(rows + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mideface-eval",
        description=__doc__,  # the --help text: plain, no markup
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "heads",
        nargs="+",
        type=Path,
        metavar="HEAD",
        help="original (intact) head volume; a folder stands for every *.nii* file in it",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="output folder: results.md, results.json, subjects/, defaced/METHOD/, brain/",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(DEFAULT_METHODS),
        metavar="METHOD",
        help=f"defacers to compare, among {', '.join(METHODS)} (default: "
        f"{' '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--sources",
        type=Path,
        default=DEFAULT_SOURCES,
        metavar="DIR",
        help=f"folder holding {metrics.SSW_FILE} and {metrics.ICBM_BRAIN_FILE}, for the "
        "independent brain mask (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        dest="seeds",
        type=int,
        nargs="+",
        default=[DEFAULT_SEED],
        metavar="N",
        help=f"noise seed(s) of mideface's fill (mideface --seed; default {DEFAULT_SEED}): "
        "mideface defaces every head once per seed and its rows pool the probes of all of "
        "them (a count from one noise draw moves by about two probes in 21); the tissue and "
        "brain-mask volumes come from the first seed. A head's cached record is reused only "
        "for the same seeds",
    )
    parser.add_argument(
        "--no-tissue",
        dest="tissue",
        action="store_false",
        help="skip the tissue volumes (Atropos) and the brain mask estimated again on each "
        "defaced image: faster, brain voxels changed are still counted",
    )
    args = parser.parse_args(argv)
    heads = [p for h in args.heads for p in (sorted(h.glob("*.nii*")) if h.is_dir() else [h])]
    methods = tuple(args.methods)
    args.seeds = tuple(dict.fromkeys(args.seeds))  # a seed given twice is one draw
    sources = [args.sources / name for name in (metrics.SSW_FILE, metrics.ICBM_BRAIN_FILE)]
    # the per-subject files are a cache that a rerun reuses or replaces (force), so they stay
    # when a later head fails; results.json and .md appear only from a complete run
    cache = io.Publisher([*heads, *sources], force=True)
    results = io.Publisher([*heads, *sources], force=True)
    try:
        for source in sources:
            if not source.is_file():
                raise io.InputError(f"{source}: file not found (see --sources)")
        for head in heads:
            io.load_volume(head)  # fail early, naming the file
        runs = method_runs(methods, args.seeds)
        planned = [f for head in heads for f in head_outputs(head, args.out, runs).values()]
        results.check_all([*planned, args.out / "results.json", args.out / "results.md"])
        with io.locked(args.out, "output folder"):
            table = _evaluate(args, heads, methods, cache, results)
    except Exception as err:  # noqa: BLE001 - one clear line for any failure
        results.rollback()
        print(f"mideface-eval: error: {err}", file=sys.stderr)
        return 1
    print(table)
    return 0


def _evaluate(args, heads: list[Path], methods: tuple[str, ...], cache, results) -> str:
    """Evaluate every head (reusing cached subjects), publish the results; return the table."""
    records, arrays = [], []
    runs = method_runs(methods, args.seeds)
    for head in heads:
        files = head_outputs(head, args.out, runs)
        cache_json, cache_npz = files["json"], files["npz"]
        cached = json.loads(cache_json.read_text()) if cache_json.is_file() else None
        reusable = (
            cached
            and cached.get("format") == RECORD_FORMAT
            and cached.get("seeds") == list(args.seeds)
        )
        if reusable and set(runs) <= set(cached["methods"]) and cache_npz.is_file():
            record, arr = cached, dict(np.load(cache_npz))
        else:
            record, arr = evaluate_head(
                head, args.out, methods, args.sources, args.tissue, cache, seeds=args.seeds
            )
            cache.write_bytes(_npz_bytes(arr), cache_npz)
            cache.write_text(json.dumps(record, indent=1), cache_json)
        records.append(record)
        arrays.append(arr)
        print(f"{head.name}: done", flush=True)
    summary = summarise(records, arrays, methods, args.seeds)
    table = markdown_table(summary)
    with results.staged(args.out):
        results.write_text(json.dumps(summary, indent=1), args.out / "results.json")
        results.write_text(table, args.out / "results.md")
    return table


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The compressed .npz file of ``arrays``, to publish."""
    buffer = BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


if __name__ == "__main__":
    sys.exit(main())
