"""BIDS datasets: find each session's T1w and other anatomical images, name and write derivatives.

Plain functions, no Nipype: ``discover`` lists the sessions to deface, ``face_mask_name`` and
``sidecar_path`` give the BIDS-derivative names, ``write_session_outputs`` publishes one
session's results (atomically, with sidecars) and ``keep_originals`` saves the raw images before
an in-place run. The graph that drives them lives in ``bids_workflows``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mideface_nipype import __version__, fill, io

LOGGER = logging.getLogger("mideface")

#: The contrast whose face mask defaces the rest of its session.
REFERENCE_SUFFIX = "T1w"
#: Anatomical (``anat/``) suffixes defaced with the reference's face mask (BIDS 1.9 + legacy).
ANAT_SUFFIXES = (
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
)
#: BIDS version written into a new derivative dataset when the raw dataset names none.
BIDS_VERSION = "1.9.0"
#: Where an in-place run keeps the raw images, inside the derivative dataset.
ORIGINALS_DIR = "sourcedata"
FACE_MASK_DESCRIPTION = (
    "MiDeFace face mask on this image's grid: 0 untouched, 1 tissue under the template face, "
    "2 air under it, 3 tissue beyond it, 4 air beyond it"
)
EXCLUSION_MASK_DESCRIPTION = (
    "voxels defacing never modifies: brain and eyes (and skull, from the segmentation), dilated"
)


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


def parse_name(name: str) -> tuple[list[tuple[str, str]], str, str]:
    """``sub-01_ses-1_T1w.nii.gz`` -> ([("sub", "01"), ("ses", "1")], "T1w", ".nii.gz")."""
    stem, ext = io.split_suffix(name)
    if not ext:
        stem, dot, rest = name.partition(".")
        ext = dot + rest
    *parts, suffix = stem.split("_")
    entities = [tuple(p.split("-", 1)) for p in parts if "-" in p]
    return entities, suffix, ext


def _images(anat: Path) -> list[Path]:
    return sorted(
        p
        for p in anat.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and io.split_suffix(p.name)[1] in (".nii.gz", ".nii")
        and parse_name(p.name)[1] in ANAT_SUFFIXES
    )


def discover(bids_dir: str | Path, participant_labels: list[str] | None = None) -> list[Session]:
    """Sessions of a BIDS dataset that have a T1w, in order; raise ``InputError`` if none."""
    root = Path(bids_dir).resolve()
    if not root.is_dir():
        raise io.InputError(f"{bids_dir}: BIDS folder not found")
    if not (root / "dataset_description.json").is_file():
        raise io.InputError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json)")
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if participant_labels:
        wanted = [label.removeprefix("sub-") for label in participant_labels]
        known = {p.name.removeprefix("sub-") for p in subjects}
        missing = [label for label in wanted if label not in known]
        if missing:
            raise io.InputError(f"{bids_dir}: no participant {', '.join(missing)}")
        subjects = [p for p in subjects if p.name.removeprefix("sub-") in wanted]
    sessions = []
    for subject_dir in subjects:
        session_dirs = sorted(p for p in subject_dir.glob("ses-*") if p.is_dir()) or [subject_dir]
        for folder in session_dirs:
            anat = folder / "anat"
            images = _images(anat) if anat.is_dir() else []
            t1w = [p for p in images if parse_name(p.name)[1] == REFERENCE_SUFFIX]
            label = folder.relative_to(root)
            if not t1w:
                if images:
                    LOGGER.warning("%s: no T1w, skipped (%d other images)", label, len(images))
                continue
            rel = [str(p.relative_to(root)) for p in images]
            reference = str(t1w[0].relative_to(root))
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
        raise io.InputError(f"{bids_dir}: no T1w image found in any sub-*/[ses-*/]anat folder")
    return sessions


def face_mask_name(rel: str, *, reference: bool, desc: str = "face") -> str:
    """``sub-01_T1w.nii.gz`` -> ``sub-01_desc-face_mask.nii.gz``.

    The other images of a session name their contrast in the description
    (``sub-01_desc-faceT2w_mask.nii.gz``), since they often share every entity with the T1w.
    """
    path = Path(rel)
    entities, suffix, _ = parse_name(path.name)
    label = desc if reference else f"{desc}{suffix}"
    parts = [f"{k}-{v}" for k, v in entities if k != "desc"] + [f"desc-{label}", "mask.nii.gz"]
    return str(path.parent / "_".join(parts))


def sidecar_path(rel: str) -> str:
    return io.split_suffix(rel)[0] + ".json"


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
            try:
                merged.update(json.loads(candidate.read_text()))
            except (OSError, ValueError) as err:
                raise io.InputError(f"{candidate}: unreadable JSON sidecar ({err})") from err
    return merged


def _write_json(data: dict, path: Path) -> None:
    io.remove_stale_temps(path)
    io.write_text_atomic(json.dumps(data, indent=2) + "\n", path)


def _publish(src: str, dst: Path) -> None:
    io.remove_stale_temps(dst)
    io.copy_atomic(src, dst)


def dataset_description(bids_dir: str | Path) -> dict:
    """``dataset_description.json`` of the derivative dataset."""
    root = Path(bids_dir).resolve()
    raw = json.loads((root / "dataset_description.json").read_text())
    return {
        "Name": f"{raw.get('Name', root.name)} (defaced by mideface-nipype)",
        "BIDSVersion": raw.get("BIDSVersion", BIDS_VERSION),
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "mideface-nipype",
                "Version": __version__,
                "Description": "minimally invasive defacing (a MiDeFace reimplementation)",
            }
        ],
        "SourceDatasets": [{"URL": root.as_uri()}],
        "DatasetLinks": {"raw": root.as_uri()},
    }


def write_dataset_description(bids_dir: str | Path, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "dataset_description.json"
    _write_json(dataset_description(bids_dir), path)
    return path


def keep_originals(session: Session, bids_dir: str | Path, output_dir: str | Path) -> Session:
    """Before an in-place run: copy each raw image to ``OUTPUT/sourcedata`` once; read it there.

    A rerun reads the kept copies, so an image already defaced in place is never defaced again;
    an image that carries the mideface code with no kept original is refused.
    """
    root = Path(bids_dir).resolve()
    kept_root = Path(output_dir).resolve() / ORIGINALS_DIR
    for rel in (session.reference, *session.others):
        kept = kept_root / rel
        if kept.exists():
            continue
        img = io.load_volume(root / rel)
        if fill.check_code(io.stored_data(img)):
            raise io.InputError(f"{root / rel}: already defaced, and no original kept in {kept}")
        _publish(str(root / rel), kept)
        sidecar = root / sidecar_path(rel)
        if sidecar.exists():
            _publish(str(sidecar), kept_root / sidecar_path(rel))
    return Session(session.subject, session.session, session.reference, session.others, kept_root)


def write_session_outputs(
    *,
    bids_dir: str | Path,
    output_dir: str | Path,
    reference: str,
    others: list[str],
    defaced: str,
    face_mask: str,
    exclusion_mask: str,
    other_defaced: list[str],
    other_face_masks: list[str],
    in_place: bool = False,
    seed: int = fill.DEFAULT_SEED,
) -> list[str]:
    """Publish one session: defaced images (derivative or in place), face masks, sidecars.

    Every file is written to a temporary name and renamed, so a killed run leaves complete files
    or none. Returns the paths written.
    """
    root, out = Path(bids_dir).resolve(), Path(output_dir).resolve()
    written: list[Path] = []
    provenance = {
        "Description": f"defaced by mideface-nipype {__version__} (MiDeFace), "
        f"face mask from {Path(reference).name}",
        "DefaceSeed": seed,
    }
    images = [(reference, defaced, face_mask)]
    images += zip(others, other_defaced, other_face_masks, strict=True)
    for rel, image, mask in images:
        source_uri = f"bids:raw:{rel}"
        target = root / rel if in_place else out / rel
        _publish(image, target)
        if not in_place:
            meta = inherited_metadata(root, rel) | {"Sources": [source_uri]} | provenance
            _write_json(meta, out / sidecar_path(rel))
            written.append(out / sidecar_path(rel))
        mask_path = out / face_mask_name(rel, reference=rel == reference)
        _publish(mask, mask_path)
        mask_meta = {"Type": "Face", "Sources": [source_uri], "Description": FACE_MASK_DESCRIPTION}
        _write_json(mask_meta, out / sidecar_path(str(mask_path.relative_to(out))))
        written += [target, mask_path]
    xmask_path = out / face_mask_name(reference, reference=True, desc="exclusion")
    _publish(exclusion_mask, xmask_path)
    xmask_meta = {
        "Type": "ROI",
        "Sources": [f"bids:raw:{reference}"],
        "Description": EXCLUSION_MASK_DESCRIPTION,
    }
    _write_json(xmask_meta, out / sidecar_path(str(xmask_path.relative_to(out))))
    written.append(xmask_path)
    return [str(p) for p in written]


def expected_outputs(
    session: Session, bids_dir: str | Path, output_dir: str | Path, *, in_place: bool
) -> list[Path]:
    """The image files a finished session writes (to tell finished sessions from failed ones)."""
    out = Path(output_dir).resolve()
    image_root = Path(bids_dir).resolve() if in_place else out
    rels = (session.reference, *session.others)
    return [image_root / rel for rel in rels] + [
        out / face_mask_name(rel, reference=rel == session.reference) for rel in rels
    ]
