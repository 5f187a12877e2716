"""BIDS datasets: find each session's T1w and other anatomical images, name and write derivatives.

Plain functions, no Nipype: ``discover`` lists the sessions to deface (every anatomical suffix
of BIDS, ``.bidsignore`` and fMRIPrep-style filters honoured), ``validate`` checks every input
before any work, ``plan_derivatives`` / ``prepare_in_place`` decide what a run defaces (skipping
what is already defaced, refusing to overwrite), ``defaced_name``, ``face_mask_name`` (a
``_dseg`` with its label table), ``exclusion_mask_name`` and ``sidecar_path`` give the
BIDS-derivative names, ``session_files`` where one session's results go (with sidecars, in
millimetres, its report and pictures: ``interfaces.outputs.Publish`` writes them, all or
nothing), ``replace_raw`` puts a defaced image over its raw one in place, and
``write_subject_report`` writes the subject's ``sub-<label>.html``. The derivative dataset
passes the official validator (``bids-validator-deno``). The graph that drives them lives in
``workflows.bids``.

In place, nothing can be lost: before a raw image is replaced, its original is copied to
``OUTPUT/sourcedata`` (fsynced) and its checksum recorded in ``sourcedata/mideface-manifest.json``
together with the checksum of the defaced image about to replace it. A rerun compares each raw
image with the manifest: the recorded defaced image is done, the recorded original (a run killed
before replacing it) is defaced again, anything else is new data, kept as the new original (the
old one moves to ``sourcedata/superseded/<checksum>/``) and defaced.
"""

from __future__ import annotations

import fnmatch
import hashlib
import html
import json
import logging
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path

from mideface_nipype import __version__
from mideface_nipype.engine import fill
from mideface_nipype.reports import report
from mideface_nipype.reports.slices import LABEL_COLOURS, LABEL_NAMES
from mideface_nipype.utils import io

LOGGER = logging.getLogger(__name__)

#: The BIDS version whose schema the names and metadata here follow (the schema that
#: bids-validator 3.0.2 bundles), written into the derivative dataset.
BIDS_VERSION = "1.11.1"
#: The contrast whose face mask defaces the rest of its session (``--bids-filter-file`` may
#: name others under ``"t1w": {"suffix": ...}``).
REFERENCE_SUFFIX = "T1w"
#: Every anatomical (``anat/``) image suffix of BIDS 1.11.1 (schema ``rules.files.raw.anat``:
#: nonparametric, parametric, megre, mese, multiflip, multiinversion, mp2rage, vfamt, mtr), but
#: ``defacemask``; all of them show the face and are defaced with the reference's face mask.
ANAT_SUFFIXES = (
    # nonparametric (T2star, FLASH, PD: deprecated, still found in older datasets)
    "T1w",
    "T2w",
    "PDw",
    "T2starw",
    "FLAIR",
    "inplaneT1",
    "inplaneT2",
    "PDT2",
    "angio",
    "T2star",
    "FLASH",
    "PD",
    # parametric
    "T1map",
    "T2map",
    "T2starmap",
    "R1map",
    "R2map",
    "R2starmap",
    "PDmap",
    "MTRmap",
    "MTsat",
    "UNIT1",
    "T1rho",
    "MWFmap",
    "MTVmap",
    "Chimap",
    "S0map",
    "M0map",
    # file collections
    "MEGRE",
    "MESE",
    "VFA",
    "IRT1",
    "MP2RAGE",
    "MPM",
    "MTS",
    "MTR",
)
#: ``desc`` of the defaced images in the derivative dataset, so they can be told from the raw
#: ones (pybids: ``layout.get(desc="defaced")``).
DEFACED_DESC = "defaced"
#: ``desc`` of the face masks (``_dseg``; the other images' add their suffix: ``faceT2w``) and
#: of the exclusion mask (``_mask``).
FACE_DESC = "face"
EXCLUSION_DESC = "exclusion"
#: Where the published code of this package lives (``GeneratedBy.CodeURL``).
CODE_URL = "https://pypi.org/project/mideface-nipype/"
#: Where an in-place run keeps the raw images, inside the derivative dataset.
ORIGINALS_DIR = "sourcedata"
#: The in-place record, inside ``ORIGINALS_DIR``: dataset identity, checksums of each original
#: and of the defaced image that replaced it.
MANIFEST_NAME = "mideface-manifest.json"
#: Where an original replaced by new raw data is kept, inside ``ORIGINALS_DIR``.
SUPERSEDED_DIR = "superseded"
#: A session's report and pictures, inside ``sub-<label>/`` of the derivative dataset.
FIGURES_DIR = "figures"
#: Files of the derivative dataset that BIDS does not name (reports, pictures, transforms):
#: its ``.bidsignore``.
BIDSIGNORE = ("*.html", f"sub-*/{FIGURES_DIR}", "*_xfm.txt")
#: A BIDS label: letters and digits only.
LABEL_RE = re.compile(r"[A-Za-z0-9]+")
#: ``sub-<label>_..._<suffix>.nii[.gz]``: an image named the BIDS way, whose defaced copy
#: ``mideface`` gives a JSON sidecar.
BIDS_IMAGE_RE = re.compile(rf"^sub-{LABEL_RE.pattern}_\S*\.nii(\.gz)?$")
#: The face mask's compartments (``bracket.bracket_face``) as the rows of its ``dseg.tsv``:
#: index, name, abbreviation, colour (as in slices.png), description.
FACE_LABELS = (
    (0, "untouched", "U", "#000000", "left as it is, bit for bit"),
    (
        1,
        "inward_tissue",
        "IT",
        "#ff9628",
        "between the template face and its inward projection, in the head: tissue noise",
    ),
    (
        2,
        "inward_air",
        "IA",
        "#ffeb3c",
        "between the template face and its inward projection, in air: tissue noise",
    ),
    (
        3,
        "outward_tissue",
        "OT",
        "#3cd2ff",
        "between the template face and its outward projection, in the head: background noise",
    ),
    (
        4,
        "outward_air",
        "OA",
        "#506eff",
        "between the template face and its outward projection, in air: background noise",
    ),
)
#: The published face mask's labels (``fill.shareable_face_mask``): the tissue/air split of
#: ``FACE_LABELS`` traces the original skin, so the derivatives carry the two sides only.
SHAREABLE_FACE_LABELS = (
    FACE_LABELS[0],
    (
        1,
        "inward",
        "I",
        "#ff9628",
        "between the template face and its inward projection: tissue noise",
    ),
    (
        3,
        "outward",
        "O",
        "#3cd2ff",
        "between the template face and its outward projection: background noise",
    ),
)
#: The segmentation's picture (``--samseg``) and its caption in the subject's report.
SEGMENTATION_PICTURE = "segmentation.png"
SEGMENTATION_CAPTION = (
    "The segmentation that makes the exclusion mask (brain, skull, eyes): label borders on "
    "slices through the head centre."
)
#: Keys of the raw dataset's description that hold for its defaced copy too.
CARRIED_KEYS = (
    "License",
    "Authors",
    "Acknowledgements",
    "HowToAcknowledge",
    "Funding",
    "EthicsApprovals",
    "ReferencesAndLinks",
)
README_TEMPLATE = """\
# {name}

A BIDS derivative dataset written by `mideface-bids` (mideface-nipype {version}, a
reimplementation of FreeSurfer's MiDeFace): every anatomical image of the raw dataset
(`DatasetLinks.raw` in `dataset_description.json`) with its face replaced by noise,
the brain, skull base and eyes untouched, bit for bit.

Per subject and session, in `anat/`:

- `*_desc-defaced_<suffix>.nii[.gz]` and `.json`: the defaced image (same grid, data type and
  scaling as the raw one) and its metadata: the raw sidecar after inheritance, `Sources`,
  `SkullStripped: false`, `SpatialReference`, `Description`, `DefaceSeed`.
- `*_desc-face_dseg.nii.gz` (`.tsv`, `.json`): the face mask of the reference image (the T1w),
  a labelled segmentation: 0 untouched, 1 between the template face and its inward
  projection, 3 between it and its outward projection; the `.tsv` names the labels. It has
  no tissue/air split (that would trace the original skin); `mideface --apply` splits it at
  the defaced image's own head.
- `*_desc-face<suffix>_dseg.nii.gz`: the same mask carried onto another image's grid.
- `*_desc-exclusion_mask.nii.gz`: the voxels defacing never modifies (brain, skull, eyes).
- `*_from-<suffix>_to-mideface_mode-image_xfm.txt`: the 4x4 RAS matrix from the reference's
  millimetres to the atlas's, which `mideface-bids --init-reg` reads back.

`sub-<label>.html` is each subject's report (pictures and session reports in
`sub-<label>/figures/`); reports and transforms are listed in `.bidsignore`.

**Before sharing**: the pictures made with `--pics` show the original face (`face-before.png`
renders the original skin, `slices.png` outlines the original slices): keep them with the raw
data.

Query with pybids:

```python
from bids import BIDSLayout

layout = BIDSLayout("<raw dataset>", derivatives="<this folder>")
defaced = layout.get(scope="mideface-nipype", desc="defaced", extension=".nii.gz")
t1w = layout.get(scope="mideface-nipype", desc="defaced", suffix="T1w", subject="01")
masks = layout.get(scope="mideface-nipype", desc="face", suffix="dseg", extension=".nii.gz")
```

Licence: the raw dataset's ({license}).
"""
FACE_MASK_DESCRIPTION = (
    "MiDeFace face mask on this image's grid (labels in the .tsv beside it): 0 untouched, "
    "1 inside the template face (tissue noise), 3 beyond it (background noise); without the "
    "tissue/air split of mideface's face.mask, which traces the original skin"
)
#: The ``description`` column of the face mask's ``dseg.tsv``, defined in its sidecar.
LABEL_COLUMN_DESCRIPTION = "where the label lies and what fills it"
EXCLUSION_MASK_DESCRIPTION = (
    "voxels defacing never modifies: brain and eyes (and skull, from the segmentation), dilated"
)
#: fMRIPrep's ``--bids-filter-file`` entity names -> the short names of file names.
FILTER_ENTITIES = {
    "session": "ses",
    "task": "task",
    "acquisition": "acq",
    "ceagent": "ce",
    "reconstruction": "rec",
    "direction": "dir",
    "run": "run",
    "echo": "echo",
    "flip": "flip",
    "inversion": "inv",
    "mtransfer": "mt",
    "part": "part",
    "chunk": "chunk",
}


@dataclass(frozen=True)
class Session:
    """One subject (and session) to deface: the reference T1w and its other anatomicals.

    Paths are relative to the BIDS root; ``source_root`` is where they are read from (the BIDS
    root, or the kept originals of an in-place run).
    """

    subject: str
    session: str | None
    reference: str
    others: tuple[str, ...]
    source_root: Path
    #: False when the reference only gives its face mask (already defaced in place earlier).
    publish_reference: bool = True

    @property
    def images(self) -> tuple[str, ...]:
        return (self.reference, *self.others)

    @property
    def published(self) -> tuple[str, ...]:
        """The images this run writes."""
        return self.images if self.publish_reference else self.others

    @property
    def label(self) -> str:
        """``sub-01`` or ``sub-01_ses-pre``."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def name(self) -> str:
        """A Nipype-safe name: ``sub_01`` or ``sub_01_ses_pre``."""
        return "".join(c if c.isalnum() else "_" for c in self.label)

    def source(self, rel: str) -> Path:
        return self.source_root / rel


def is_bids_name(path: str | Path) -> bool:
    """True for ``sub-<label>_..._<suffix>.nii[.gz]``, the images that get a JSON sidecar."""
    return bool(BIDS_IMAGE_RE.match(Path(path).name))


def parse_name(name: str) -> tuple[list[tuple[str, str]], str, str]:
    """``sub-01_ses-1_T1w.nii.gz`` -> ([("sub", "01"), ("ses", "1")], "T1w", ".nii.gz")."""
    stem, ext = io.split_suffix(name)
    if not ext:
        stem, dot, rest = name.partition(".")
        ext = dot + rest
    *parts, suffix = stem.split("_")
    entities = [tuple(p.split("-", 1)) for p in parts if "-" in p]
    return entities, suffix, ext


def read_bidsignore(root: Path) -> list[str]:
    """The patterns of the dataset's ``.bidsignore`` (none when there is no such file)."""
    path = root / ".bidsignore"
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def is_ignored(rel: str, patterns: list[str]) -> bool:
    """Whether ``.bidsignore`` ``patterns`` (gitignore style, as the validator reads them)
    exclude ``rel``: a pattern with a ``/`` is anchored at the root, one without matches any
    file or folder name, a trailing ``/`` matches folders only, ``**/`` any depth."""
    parts = Path(rel).parts
    for pattern in patterns:
        depth = len(parts) - 1 if pattern.endswith("/") else len(parts)
        body = pattern.strip("/")
        if body.startswith("**/"):  # at any depth: every tail of every prefix
            body = body[3:]
            names = ["/".join(parts[j : i + 1]) for i in range(depth) for j in range(i + 1)]
        elif "/" in body:  # anchored at the root: every prefix
            names = ["/".join(parts[: i + 1]) for i in range(depth)]
        else:  # any file or folder name
            names = list(parts[:depth])
        if any(fnmatch.fnmatchcase(name, body) for name in names):
            return True
    return False


def load_filters(path: str | Path) -> dict[str, dict]:
    """fMRIPrep's ``--bids-filter-file``: {query: {entity: value}}; ``InputError`` naming the
    file when it is not one.

    A query is named after a lower-case suffix (``t1w``, ``t2w``, ``flair``, ``unit1``, ...)
    and filters the images of that suffix; ``t1w`` filters the reference and may name its
    suffix (``"suffix": "UNIT1"``). A value is a label, a list of labels, ``null`` (the entity
    must be absent) or ``"*"`` (it must be present). Queries of other datatypes (``bold``,
    ``fmap``, ...) do not concern anatomical images and are left out.
    """
    filters = _load_json(Path(path))
    known = (*FILTER_ENTITIES, "datatype", "suffix", "extension")
    for name, query in filters.items():
        if not isinstance(query, dict):
            raise io.InputError(f"{path}: query '{name}' is not an object of entity filters")
        for entity in query:
            if entity not in known:
                raise io.InputError(
                    f"{path}: unknown entity '{entity}' in query '{name}' "
                    f"(known: {', '.join(known)})"
                )
    return filters


def _wanted(value: object, have: str | None) -> bool:
    """Whether an entity value ``have`` (None: absent) passes one filter value."""
    if value is None:
        return have is None
    if value == "*":
        return have is not None
    if have is None:
        return False
    for want in value if isinstance(value, list) else [value]:
        if isinstance(want, int) and have.isdigit():
            if int(have) == want:
                return True
        elif str(want) == have:
            return True
    return False


def _passes(name: str, query: dict) -> bool:
    entities, _, ext = parse_name(name)
    labels = dict(entities)
    for key, value in query.items():
        if key == "datatype":
            ok = _wanted(value, "anat")
        elif key == "extension":
            ok = _wanted(value, ext) or _wanted(value, ext.lstrip("."))
        elif key == "suffix":
            continue  # chooses the query, see _query_of
        else:
            ok = _wanted(value, labels.get(FILTER_ENTITIES[key]))
        if not ok:
            return False
    return True


def reference_suffixes(filters: dict[str, dict]) -> list[str]:
    """The suffixes a reference may have, in order of preference (default ``T1w``)."""
    value = filters.get("t1w", {}).get("suffix", REFERENCE_SUFFIX)
    return list(value) if isinstance(value, list) else [str(value)]


def _images(anat: Path, root: Path, ignored: list[str], filters: dict[str, dict]) -> list[Path]:
    """The anatomical images of an ``anat/`` folder that ``.bidsignore`` and the filters keep."""
    references = reference_suffixes(filters)
    found = []
    for path in sorted(anat.iterdir()):
        suffix = parse_name(path.name)[1]
        if (
            not path.is_file()
            or path.name.startswith(".")
            or io.split_suffix(path.name)[1] not in (".nii.gz", ".nii")
            or suffix not in (*ANAT_SUFFIXES, *references)
            or is_ignored(str(path.relative_to(root)), ignored)
        ):
            continue
        query = filters.get("t1w" if suffix in references else suffix.lower(), {})
        if _passes(path.name, query):
            found.append(path)
    return found


def _check_label(folder: Path, entity: str) -> None:
    """A ``sub-``/``ses-`` folder's label must be letters and digits (BIDS): ``sub-a-b`` and
    ``sub-a_b`` would otherwise both become the session name ``sub_a_b``."""
    label = folder.name.removeprefix(f"{entity}-")
    if not LABEL_RE.fullmatch(label):
        raise io.InputError(
            f"{folder}: '{label}' is not a BIDS {entity} label (letters and digits only); "
            "rename the folder"
        )


def _check_entities(image: Path, subject_dir: Path, folder: Path) -> None:
    """An image must name the subject (and session) of the folders it is in."""
    entities = dict(parse_name(image.name)[0])
    wanted = {"sub": subject_dir.name.removeprefix("sub-")}
    if folder != subject_dir:
        wanted["ses"] = folder.name.removeprefix("ses-")
    for key, label in wanted.items():
        found = entities.get(key)
        if found != label:
            named = f"{key}-{found}" if found else f"no {key}- entity"
            raise io.InputError(
                f"{image}: is in the {key}-{label} folder but its name has {named} "
                "(a BIDS file name repeats its subject and session)"
            )


def discover(
    bids_dir: str | Path,
    participant_labels: list[str] | None = None,
    filters: dict[str, dict] | None = None,
) -> list[Session]:
    """Sessions of a BIDS dataset that have a reference (T1w), in order; raise ``InputError``
    if none. ``.bidsignore`` is honoured; ``filters`` are ``load_filters``'s queries."""
    root = Path(bids_dir).resolve()
    if not root.is_dir():
        raise io.InputError(f"{bids_dir}: BIDS folder not found")
    if not (root / "dataset_description.json").is_file():
        raise io.InputError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json)")
    filters = filters or {}
    references = reference_suffixes(filters)
    ignored = read_bidsignore(root)
    subjects = sorted(
        p
        for p in root.glob("sub-*")
        if p.is_dir() and not is_ignored(str(p.relative_to(root)), ignored)
    )
    if participant_labels:
        wanted = [label.removeprefix("sub-") for label in participant_labels]
        known = {p.name.removeprefix("sub-") for p in subjects}
        missing = [label for label in wanted if label not in known]
        if missing:
            raise io.InputError(f"{bids_dir}: no participant {', '.join(missing)}")
        subjects = [p for p in subjects if p.name.removeprefix("sub-") in wanted]
    sessions = []
    for subject_dir in subjects:
        _check_label(subject_dir, "sub")
        session_dirs = sorted(p for p in subject_dir.glob("ses-*") if p.is_dir()) or [subject_dir]
        for folder in session_dirs:
            if folder != subject_dir:
                _check_label(folder, "ses")
            anat = folder / "anat"
            images = _images(anat, root, ignored, filters) if anat.is_dir() else []
            for image in images:
                _check_entities(image, subject_dir, folder)
            candidates = [
                p for suffix in references for p in images if parse_name(p.name)[1] == suffix
            ]
            label = folder.relative_to(root)
            if not candidates:
                if images:
                    LOGGER.warning(
                        "%s: no %s, skipped (%d other images)",
                        label,
                        " or ".join(references),
                        len(images),
                    )
                continue
            rel = [str(p.relative_to(root)) for p in images]
            reference = str(candidates[0].relative_to(root))
            sessions.append(
                Session(
                    subject=subject_dir.name.removeprefix("sub-"),
                    session=folder.name.removeprefix("ses-") if folder != subject_dir else None,
                    reference=reference,
                    others=tuple(r for r in rel if r != reference),
                    source_root=root,
                )
            )
    if not sessions:
        raise io.InputError(
            f"{bids_dir}: no {' or '.join(references)} image found in any sub-*/[ses-*/]anat folder"
        )
    return sessions


def derivative_name(rel: str, *, desc: str, suffix: str | None = None, ext: str = "") -> str:
    """``rel`` with ``desc-<desc>`` as its last entity (and another ``suffix`` or extension):
    ``sub-01/anat/sub-01_T1w.nii.gz`` -> ``sub-01/anat/sub-01_desc-defaced_T1w.nii.gz``."""
    path = Path(rel)
    entities, own_suffix, own_ext = parse_name(path.name)
    parts = [f"{k}-{v}" for k, v in entities if k != "desc"] + [f"desc-{desc}"]
    return str(path.parent / ("_".join([*parts, suffix or own_suffix]) + (ext or own_ext)))


def defaced_name(rel: str) -> str:
    """Where a defaced image goes in the derivative dataset (``desc-defaced``)."""
    return derivative_name(rel, desc=DEFACED_DESC)


def face_mask_name(rel: str, *, reference: bool) -> str:
    """``sub-01_T1w.nii.gz`` -> ``sub-01_desc-face_dseg.nii.gz``, a labelled segmentation.

    The other images of a session name their contrast in the description
    (``sub-01_desc-faceT2w_dseg.nii.gz``), since they often share every entity with the T1w.
    """
    label = FACE_DESC if reference else f"{FACE_DESC}{parse_name(Path(rel).name)[1]}"
    return derivative_name(rel, desc=label, suffix="dseg", ext=".nii.gz")


def exclusion_mask_name(reference: str) -> str:
    """``sub-01_T1w.nii.gz`` -> ``sub-01_desc-exclusion_mask.nii.gz``."""
    return derivative_name(reference, desc=EXCLUSION_DESC, suffix="mask", ext=".nii.gz")


def transform_name(reference: str) -> str:
    """``sub-01_T1w.nii.gz`` -> ``sub-01_from-T1w_to-mideface_mode-image_xfm.txt``: the 4x4 RAS
    matrix (subject mm -> atlas mm) that ``--init-reg DIR`` reads back."""
    path = Path(reference)
    entities, suffix, _ = parse_name(path.name)
    parts = [f"{k}-{v}" for k, v in entities if k != "desc"]
    parts += [f"from-{suffix}", "to-mideface", "mode-image", "xfm.txt"]
    return str(path.parent / "_".join(parts))


def sidecar_path(rel: str) -> str:
    return io.split_suffix(rel)[0] + ".json"


def labels_path(rel: str) -> str:
    """The label table (``dseg.tsv``) beside a segmentation."""
    return io.split_suffix(rel)[0] + ".tsv"


def figure_name(session: Session | str, name: str) -> str:
    """``sub-01/figures/sub-01_ses-pre_<name>``: a session's report or picture."""
    label = session if isinstance(session, str) else session.label
    return f"{label.split('_')[0]}/{FIGURES_DIR}/{label}_{name}"


def face_labels_tsv() -> str:
    """The ``dseg.tsv`` of every published face mask."""
    rows = [("index", "name", "abbreviation", "color", "description"), *SHAREABLE_FACE_LABELS]
    return "".join("\t".join(map(str, row)) + "\n" for row in rows)


def inherited_metadata(bids_dir: str | Path, rel: str) -> dict:
    """The image's JSON metadata after BIDS inheritance (top level first, its own file last)."""
    root = Path(bids_dir)
    parts = Path(rel).parts
    entities, suffix, _ = parse_name(parts[-1])
    own = dict(entities)
    merged: dict = {}
    for depth in range(len(parts)):
        level = root.joinpath(*parts[:depth])
        found = []
        for candidate in level.glob(f"*{suffix}.json"):
            ents, sfx, _ = parse_name(candidate.name)
            if sfx == suffix and all(own.get(k) == v for k, v in ents):
                found.append((len(ents), candidate))
        for _, candidate in sorted(found):
            merged.update(_load_json(candidate))
    return merged


def _load_json(path: Path) -> dict:
    """A JSON object file; ``InputError`` naming the file if it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise io.InputError(f"{path}: unreadable JSON ({reason})") from err
    if not isinstance(data, dict):
        raise io.InputError(f"{path}: unreadable JSON (not an object)")
    return data


def _json_text(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def _file_mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _copy(publisher: io.Publisher, src: str | Path, dst: Path, *, mode: int | None = None) -> None:
    """Publish a copy, first clearing temporary files a killed earlier run left beside ``dst``."""
    io.remove_stale_temps(dst)
    publisher.copy(src, dst, mode=mode)


def validate(
    sessions: list[Session], bids_dir: str | Path, *, max_gb: float = io.DEFAULT_MAX_GB
) -> None:
    """Check every input of a run before any work; ``InputError`` naming the first bad file.

    The dataset's top-level JSON files and every JSON file of the subjects to deface (a broken
    sidecar must not be found after minutes of work), then every image (header, size against
    ``max_gb``, data: ``io.load_volume``).
    """
    root = Path(bids_dir).resolve()
    subjects = sorted({root / f"sub-{s.subject}" for s in sessions})
    found = sorted(root.glob("*.json")) + [p for d in subjects for p in sorted(d.rglob("*.json"))]
    for path in found:
        if not path.name.startswith("."):
            _load_json(path)
    for session in sessions:
        for rel in session.images:
            io.load_volume(root / rel, max_gb=max_gb)


def _session_file(folder: Path, rel: str, option: str) -> Path:
    if not folder.is_dir():
        raise io.InputError(f"{folder}: {option} folder not found")
    path = folder / rel
    if not path.is_file():
        raise io.InputError(f"{path}: not found ({option} {folder} names a file per session)")
    return path


def session_xmasks(sessions: list[Session], folder: str | Path) -> dict[str, Path]:
    """{session label: its own exclusion mask}, ``folder`` laid out as a derivative dataset of
    this package (``exclusion_mask_name``); each on its reference's grid, else ``InputError``."""
    found = {}
    for session in sessions:
        path = _session_file(Path(folder), exclusion_mask_name(session.reference), "--xmask")
        shape = io.load_volume(path).shape[:3]
        grid = io.load_volume(session.source(session.reference)).shape[:3]
        if shape != grid:
            raise io.InputError(
                f"{path}: the exclusion mask has shape {shape}, not the grid {grid} of "
                f"{session.reference}"
            )
        found[session.label] = path
    return found


def session_transforms(sessions: list[Session], folder: str | Path) -> dict[str, Path]:
    """{session label: its initial 4x4 RAS transform} (``transform_name`` in ``folder``)."""
    found = {}
    for session in sessions:
        path = _session_file(Path(folder), transform_name(session.reference), "--init-reg")
        io.load_matrix(path)
        found[session.label] = path
    return found


def defaced_mark(bids_dir: str | Path, rel: str) -> str | None:
    """Why the image ``rel`` counts as defaced already (None if it does not): the ``descrip``
    stamp, a ``Defacing`` record in its sidecar, or the provenance code in its voxels."""
    root = Path(bids_dir)
    img = io.load_volume(root / rel)
    stamp = io.defaced_descrip().removesuffix(f" {__version__}")
    descrip = img.header["descrip"].item() if "descrip" in img.header else b""
    if descrip.decode("latin-1").startswith(stamp):
        return f"its NIfTI descrip says '{descrip.decode('latin-1').strip()}'"
    if "Defacing" in inherited_metadata(root, rel):
        return f"{sidecar_path(Path(rel).name)} has a Defacing record"
    if fill.check_code(io.stored_data(img)):
        return "it carries the mideface provenance code"
    return None


def _without(
    session: Session, skipped: dict[str, str], why_reference: str | None
) -> Session | None:
    """``session`` without the ``skipped`` images ({rel: why}; one log line each).

    None when nothing is left to deface. The reference stays the source of the face mask of the
    others: refused (``why_reference``) when it is itself a defaced head.
    """
    for rel, why in skipped.items():
        LOGGER.info("%s: %s; skipped (--force defaces it again)", rel, why)
    others = tuple(r for r in session.others if r not in skipped)
    if session.reference not in skipped:
        return replace(session, others=others)
    if not others:
        return None
    if why_reference:
        raise io.InputError(
            f"{session.source(session.reference)}: is defaced already ({why_reference}), so "
            f"{Path(others[0]).name} cannot get a face mask from it; give --force to deface both"
        )
    return replace(session, others=others, publish_reference=False)


def plan_derivatives(
    sessions: list[Session], bids_dir: str | Path, output_dir: str | Path, *, force: bool = False
) -> list[Session]:
    """The sessions to deface into a derivative dataset, before any work.

    Images defaced already are skipped (unless ``force``); an existing output is refused unless
    ``force`` (``OutputError``), as is an output that would overwrite an input.
    """
    root = Path(bids_dir).resolve()
    planned = []
    for session in sessions:
        marks = {} if force else {rel: defaced_mark(root, rel) for rel in session.images}
        skipped = {rel: f"already defaced ({why})" for rel, why in marks.items() if why}
        kept = _without(session, skipped, marks.get(session.reference))
        if kept is not None:
            planned.append(kept)
    outputs = [p for s in planned for p in expected_outputs(s, root, output_dir, in_place=False)]
    io.Publisher([root / rel for s in planned for rel in s.images], force=force).check_all(outputs)
    return planned


def dataset_description(bids_dir: str | Path, output_dir: str | Path) -> dict:
    """``dataset_description.json`` of the derivative dataset: licence, authors and funding of
    the raw dataset carried over, the raw dataset linked by its path relative to the output
    (``DatasetLinks.raw``, so ``Sources`` can say ``bids:raw:...``) and by its DOI, if any."""
    root, out = Path(bids_dir).resolve(), Path(output_dir).resolve()
    raw = _load_json(root / "dataset_description.json")
    source = {"URL": "bids:raw:"}
    if raw.get("DatasetDOI"):
        source["DOI"] = raw["DatasetDOI"]
    description = {
        "Name": f"{raw.get('Name', root.name)} (defaced by mideface-nipype)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
    }
    description |= {key: raw[key] for key in CARRIED_KEYS if raw.get(key)}
    return description | {
        "GeneratedBy": [
            {
                "Name": "mideface-nipype",
                "Version": __version__,
                "Description": "minimally invasive defacing (a MiDeFace reimplementation)",
                "CodeURL": CODE_URL,
            }
        ],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": os.path.relpath(root, out)},
    }


def derivative_readme(description: dict) -> str:
    """The derivative dataset's README: what each file is, how to query it with pybids."""
    return README_TEMPLATE.format(
        name=description["Name"],
        version=__version__,
        license=description.get("License", "not stated in the raw dataset"),
    )


def write_dataset_description(bids_dir: str | Path, output_dir: str | Path) -> Path:
    """Write (or leave, when unchanged) the derivative dataset's description, README and
    ``.bidsignore``."""
    out = Path(output_dir)
    description = dataset_description(bids_dir, out)
    texts = {
        "dataset_description.json": _json_text(description),
        "README.md": derivative_readme(description),
        ".bidsignore": "".join(f"{pattern}\n" for pattern in BIDSIGNORE),
    }
    for name, text in texts.items():
        path = out / name
        if not path.is_file() or path.read_text() != text:
            io.remove_stale_temps(path)
            io.Publisher([Path(bids_dir) / "dataset_description.json"], force=True).write_text(
                text, path
            )
    return out / "dataset_description.json"


def linked_raw(output_dir: str | Path) -> Path | None:
    """The raw dataset a derivative dataset names in ``DatasetLinks.raw`` (a path relative to
    it, or a ``file://`` URI as earlier versions wrote), None when it names none."""
    out = Path(output_dir).resolve()
    links = _load_json(out / "dataset_description.json").get("DatasetLinks") or {}
    raw = links.get("raw") if isinstance(links, dict) else None
    if not isinstance(raw, str):
        return None
    if raw.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(raw).path)).resolve()
    return (out / raw).resolve()


def dataset_identity(bids_dir: str | Path) -> dict:
    """What ties an output folder to its raw dataset: its path and its description."""
    root = Path(bids_dir).resolve()
    description = root / "dataset_description.json"
    return {
        "path": str(root),
        "name": _load_json(description).get("Name"),
        "description_sha256": sha256(description),
    }


def manifest_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / ORIGINALS_DIR / MANIFEST_NAME


def read_manifest(output_dir: str | Path) -> dict | None:
    """The in-place record of an output folder (None if there is none)."""
    path = manifest_path(output_dir)
    return _load_json(path) if path.exists() else None


def _save_manifest(output_dir: Path, manifest: dict) -> None:
    path = manifest_path(output_dir)
    io.remove_stale_temps(path)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    io.Publisher([], force=True).write_text(text, path)


def check_output_folder(bids_dir: str | Path, output_dir: str | Path) -> None:
    """Refuse (``OutputError``) an output folder that belongs to another dataset: it keeps that
    dataset's originals, or it is that dataset's derivative."""
    root, out = Path(bids_dir).resolve(), Path(output_dir).resolve()
    manifest = read_manifest(out)
    if manifest is not None:
        theirs, ours = manifest.get("dataset", {}), dataset_identity(root)
        if (theirs.get("path"), theirs.get("name")) != (ours["path"], ours["name"]):
            raise io.OutputError(
                f"{out}: belongs to another dataset ({theirs.get('path')}, "
                f'"{theirs.get("name")}"), whose originals it keeps in {ORIGINALS_DIR}/; '
                "choose another output folder"
            )
    if (out / "dataset_description.json").exists():
        raw = linked_raw(out)
        if raw != root:
            raise io.OutputError(
                f"{out}: is the derivative of {raw or 'another dataset'}, not of "
                f"{root}; choose another output folder"
            )


def prepare_in_place(
    sessions: list[Session], bids_dir: str | Path, output_dir: str | Path, *, force: bool = False
) -> list[Session]:
    """Before an in-place run: decide from the manifest what to deface, keep the originals.

    Per raw image: its checksum is the recorded defaced image -> done, skipped (``force``: defaced
    again from the kept original); the recorded original -> defaced (a run stopped before
    replacing it); anything else -> new data: skipped if it is defaced already (a mark, see
    ``defaced_mark``; not with ``force``), else kept in ``sourcedata`` as the new original (an
    earlier original there is kept in ``sourcedata/superseded/<checksum>/``) and defaced. Every
    check comes before the first write; each original is copied (fsynced) and recorded before
    the graph runs. The sessions returned read the kept originals.
    """
    root, out = Path(bids_dir).resolve(), Path(output_dir).resolve()
    kept_root = out / ORIGINALS_DIR
    manifest = read_manifest(out) or {"dataset": dataset_identity(root), "images": {}}
    records = manifest["images"]
    planned, to_keep = [], []
    for session in sessions:
        skipped: dict[str, str] = {}
        mark_reference = None
        for rel in session.images:
            digest, record = sha256(root / rel), records.get(rel, {})
            if digest == record.get("defaced_sha256"):
                if not force:
                    skipped[rel] = "already defaced in place (its checksum is in the manifest)"
            elif digest != record.get("original_sha256") and not force:
                mark = defaced_mark(root, rel)
                if mark:
                    skipped[rel] = f"already defaced ({mark})"
                    mark_reference = mark if rel == session.reference else mark_reference
                else:
                    to_keep.append(rel)
            else:
                to_keep.append(rel)
        kept_session = _without(session, skipped, mark_reference)
        if kept_session is None:
            continue
        for rel in set(kept_session.images) - set(to_keep):  # read from sourcedata as it is
            kept = kept_root / rel
            if not kept.is_file() or sha256(kept) != records[rel].get("original_sha256"):
                raise io.OutputError(
                    f"{kept}: the original of {rel} is missing or changed; it cannot be "
                    "defaced again"
                )
        planned.append(replace(kept_session, source_root=kept_root))
    outputs = [p for s in planned for p in expected_outputs(s, root, out, in_place=True)]
    io.Publisher([s.source(rel) for s in planned for rel in s.images], force=True).check_all(
        outputs
    )
    for rel in to_keep:
        _keep_original(root, out, rel, manifest)
    return planned


def _keep_original(root: Path, out: Path, rel: str, manifest: dict) -> None:
    """Copy raw ``rel`` (and its sidecar) to ``sourcedata``, modes kept, and record it, never
    losing a copy kept there before: a different one is first copied (with its sidecar) to
    ``superseded/<checksum>/`` and recorded."""
    raw, kept_root = root / rel, out / ORIGINALS_DIR
    kept, digest = kept_root / rel, sha256(root / rel)
    record = manifest["images"].setdefault(rel, {})
    sidecar, kept_sidecar = root / sidecar_path(rel), kept_root / sidecar_path(rel)
    if kept.is_file() and (old := sha256(kept)) != digest:
        older = kept_root / SUPERSEDED_DIR / old[:16] / rel
        if not older.is_file() or sha256(older) != old:
            _copy(io.Publisher([], force=True), kept, older, mode=_file_mode(kept))
        older_sidecar = older.parent / kept_sidecar.name
        if kept_sidecar.is_file() and not older_sidecar.is_file():
            mode = _file_mode(kept_sidecar)
            _copy(io.Publisher([], force=True), kept_sidecar, older_sidecar, mode=mode)
        entry = {"sha256": old, "path": str(older.relative_to(kept_root))}
        if entry not in record.setdefault("superseded", []):
            record["superseded"].append(entry)
            _save_manifest(out, manifest)
        LOGGER.warning("%s: new raw data; the earlier original is kept as %s", rel, older)
    if not kept.is_file() or sha256(kept) != digest:
        _copy(io.Publisher([raw], force=True), raw, kept, mode=_file_mode(raw))
    if sidecar.is_file() and (
        not kept_sidecar.is_file() or kept_sidecar.read_bytes() != sidecar.read_bytes()
    ):
        _copy(io.Publisher([sidecar], force=True), sidecar, kept_sidecar, mode=_file_mode(sidecar))
    record.update(original_sha256=digest, defaced_sha256=None)
    _save_manifest(out, manifest)


#: The workflow outputs a session publishes whose NIfTI header must say mm (BIDS).
IN_MM_OUTPUTS = ("out_file", "face_mask", "other_out_files", "other_face_masks", "exclusion_mask")
#: Workflow outputs published as shareable face masks (``fill.shareable_face_mask``).
FACE_MASK_OUTPUTS = ("face_mask", "other_face_masks")


def session_files(
    session: Session,
    bids_dir: str | Path,
    output_dir: str | Path,
    *,
    in_place: bool,
    seed: int = fill.DEFAULT_SEED,
    pics: bool = False,
    segmentation: bool = False,
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Where one session's results go: ({workflow output: destination paths}, {path: text}).

    The defaced images (derivatives, or in place: written over the raw ones later, not here)
    with their sidecars, the face masks with their sidecars and label tables, and for the
    reference its exclusion mask, transform, report and pictures (``pics``: ``report.PICTURES``;
    ``segmentation``: ``SEGMENTATION_PICTURE``) in ``figures/``.
    """
    root, out = Path(bids_dir).resolve(), Path(output_dir).resolve()
    reference_uri = f"bids:raw:{session.reference}"
    description = f"{report.DEFACED_DESCRIPTION}, face mask from {Path(session.reference).name}"
    files: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    for rel in session.published:
        is_reference = rel == session.reference
        source_uri = f"bids:raw:{rel}"
        on_grid = {"SpatialReference": source_uri}
        if not in_place:
            defaced = out / defaced_name(rel)
            files.setdefault("out_file" if is_reference else "other_out_files", []).append(
                str(defaced)
            )
            meta = report.defaced_sidecar(
                inherited_metadata(root, rel),
                description=description,
                DefaceSeed=seed,
                Sources=list(dict.fromkeys([source_uri, reference_uri])),  # + the face mask's
                SkullStripped=False,
                **on_grid,
            )
            texts[str(out / sidecar_path(defaced_name(rel)))] = _json_text(meta)
        mask_rel = face_mask_name(rel, reference=is_reference)
        files.setdefault("face_mask" if is_reference else "other_face_masks", []).append(
            str(out / mask_rel)
        )
        mask_meta = {
            "Description": FACE_MASK_DESCRIPTION,
            "Sources": list(dict.fromkeys([reference_uri, source_uri])),
            "description": {"Description": LABEL_COLUMN_DESCRIPTION},  # the .tsv column
        } | on_grid
        texts[str(out / sidecar_path(mask_rel))] = _json_text(mask_meta)
        texts[str(out / labels_path(mask_rel))] = face_labels_tsv()
    if session.publish_reference:
        xmask_rel = exclusion_mask_name(session.reference)
        files["exclusion_mask"] = [str(out / xmask_rel)]
        xmask_meta = {
            "Description": EXCLUSION_MASK_DESCRIPTION,
            "Type": "ROI",
            "Sources": [reference_uri],
            "SpatialReference": reference_uri,
        }
        texts[str(out / sidecar_path(xmask_rel))] = _json_text(xmask_meta)
        files["transform"] = [str(out / transform_name(session.reference))]
        files["report"] = [str(out / figure_name(session, "report.html"))]
        if pics:
            files["pictures"] = [str(out / figure_name(session, name)) for name in report.PICTURES]
        if segmentation:
            picture = figure_name(session, SEGMENTATION_PICTURE)
            files["segmentation_report"] = [str(out / picture)]
    return files, texts


def replace_raw(bids_dir: str | Path, output_dir: str | Path, rel: str, image: str) -> Path:
    """Record the defaced image's checksum, then put it over the raw image (mode kept); the
    raw image's path."""
    root, out = Path(bids_dir).resolve(), Path(output_dir).resolve()
    manifest = read_manifest(out)
    record = manifest["images"][rel] if manifest else {}
    kept = out / ORIGINALS_DIR / rel
    if not (kept.is_file() and sha256(kept) == record.get("original_sha256")):
        raise io.OutputError(f"{kept}: the kept original of {rel} is missing; not replaced")
    record["defaced_sha256"] = sha256(image)
    _save_manifest(out, manifest)
    raw = root / rel
    _copy(io.Publisher([kept, image], force=True), image, raw, mode=_file_mode(raw))
    return raw


def expected_outputs(
    session: Session, bids_dir: str | Path, output_dir: str | Path, *, in_place: bool
) -> list[Path]:
    """Every file a finished session writes (to check before the run, and to tell finished
    sessions from failed ones after it); pictures (``--pics``, the segmentation's) aside."""
    files, texts = session_files(session, bids_dir, output_dir, in_place=in_place)
    paths = [Path(p) for dsts in files.values() for p in dsts] + [Path(p) for p in texts]
    if in_place:
        paths += [Path(bids_dir).resolve() / rel for rel in session.published]
    return paths


def _html_figure(src: str, caption: str, legend: str = "") -> str:
    return (
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(Path(src).name)}">'
        f"<figcaption>{html.escape(caption)}{legend}</figcaption></figure>"
    )


def _swatches(names: tuple[str, ...], colours) -> str:
    """An HTML legend: a coloured square before each name."""
    items = (
        f'<span style="display:inline-block;width:0.9em;height:0.9em;margin:0 0.3em 0 0.8em;'
        f'background:rgb({r},{g},{b})"></span>{html.escape(name)}'
        for name, (r, g, b) in zip(names, colours, strict=True)
    )
    return "<br>" + "".join(items)


def subject_report_html(output_dir: str | Path, subject: str) -> str:
    """``sub-<label>.html``: per session, a link to its report and its pictures (relative
    links into ``sub-<label>/figures/``, so the folder can be moved as a whole)."""
    out = Path(output_dir)
    figures = out / f"sub-{subject}" / FIGURES_DIR
    reports = sorted(figures.glob(f"sub-{subject}*_report.html"))
    captions = dict(report.PICTURES) | {SEGMENTATION_PICTURE: SEGMENTATION_CAPTION}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mideface: sub-{html.escape(subject)}</title>",
        f"<style>{report.STYLE}</style></head><body>",
        f"<h1>mideface: sub-{html.escape(subject)}</h1>",
        f"<p>mideface-nipype {html.escape(__version__)}; {len(reports)} session(s).</p>",
    ]
    for path in reports:
        label = path.name.removesuffix("_report.html")
        href = str(path.relative_to(out))
        parts += [
            f"<h2>{html.escape(label)}</h2>",
            f'<p><a href="{html.escape(href)}">full report</a> (warnings, statistics, '
            "options, versions, timings)</p>",
        ]
        shown = 0
        for name, caption in captions.items():
            picture = figures / f"{label}_{name}"
            if picture.is_file():
                legend = ""
                if name == SEGMENTATION_PICTURE:
                    legend = _swatches(LABEL_NAMES[1:], LABEL_COLOURS[1:])
                elif name == "slices.png":
                    legend = _swatches(
                        tuple(row[1] for row in FACE_LABELS[1:]), report.COMPARTMENT_RGB
                    ) + _swatches(("exclusion mask",), [report.XMASK_RGB])
                parts.append(_html_figure(str(picture.relative_to(out)), caption, legend))
                shown += 1
        if not shown:
            parts.append("<p>No pictures (run with <code>--pics</code>).</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_subject_report(output_dir: str | Path, subject: str) -> Path | None:
    """Write (or leave, when unchanged) ``OUTPUT_DIR/sub-<label>.html`` from the subject's
    figures, atomically; None (nothing written) when no session of it has a report yet."""
    path = Path(output_dir) / f"sub-{subject}.html"
    io.remove_stale_temps(path)  # of a run killed while writing it
    if not any((path.parent / f"sub-{subject}" / FIGURES_DIR).glob("*_report.html")):
        return None
    text = subject_report_html(output_dir, subject)
    if not path.is_file() or path.read_text() != text:
        io.write_text_atomic(text, path)
    return path
