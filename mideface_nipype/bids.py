"""BIDS datasets: find each session's T1w and other anatomical images, name and write derivatives.

Plain functions, no Nipype: ``discover`` lists the sessions to deface, ``validate`` checks every
input before any work, ``plan_derivatives`` / ``prepare_in_place`` decide what a run defaces
(skipping what is already defaced, refusing to overwrite), ``face_mask_name`` and
``sidecar_path`` give the BIDS-derivative names, and ``write_session_outputs`` publishes one
session's results (all or nothing, with sidecars). The graph that drives them lives in
``bids_workflows``.

In place, nothing can be lost: before a raw image is replaced, its original is copied to
``OUTPUT/sourcedata`` (fsynced) and its checksum recorded in ``sourcedata/mideface-manifest.json``
together with the checksum of the defaced image about to replace it. A rerun compares each raw
image with the manifest: the recorded defaced image is done, the recorded original (a run killed
before replacing it) is defaced again, anything else is new data, kept as the new original (the
old one moves to ``sourcedata/superseded/<checksum>/``) and defaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, replace
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
#: The in-place record, inside ``ORIGINALS_DIR``: dataset identity, checksums of each original
#: and of the defaced image that replaced it.
MANIFEST_NAME = "mideface-manifest.json"
#: Where an original replaced by new raw data is kept, inside ``ORIGINALS_DIR``.
SUPERSEDED_DIR = "superseded"
#: A BIDS label: letters and digits only.
LABEL_RE = re.compile(r"[A-Za-z0-9]+")
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
        _check_label(subject_dir, "sub")
        session_dirs = sorted(p for p in subject_dir.glob("ses-*") if p.is_dir()) or [subject_dir]
        for folder in session_dirs:
            if folder != subject_dir:
                _check_label(folder, "ses")
            anat = folder / "anat"
            images = _images(anat) if anat.is_dir() else []
            for image in images:
                _check_entities(image, subject_dir, folder)
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


def _write_json(publisher: io.Publisher, data: dict, dst: Path) -> None:
    io.remove_stale_temps(dst)
    publisher.write_text(_json_text(data), dst)


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


def dataset_description(bids_dir: str | Path) -> dict:
    """``dataset_description.json`` of the derivative dataset."""
    root = Path(bids_dir).resolve()
    raw = _load_json(root / "dataset_description.json")
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
    """Write (or leave, when unchanged) the derivative dataset's description."""
    path = Path(output_dir) / "dataset_description.json"
    text = _json_text(dataset_description(bids_dir))
    if not path.is_file() or path.read_text() != text:
        io.remove_stale_temps(path)
        io.Publisher([Path(bids_dir) / "dataset_description.json"], force=True).write_text(
            text, path
        )
    return path


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
    description = out / "dataset_description.json"
    if description.exists():
        sources = _load_json(description).get("SourceDatasets") or [{}]
        urls = [d.get("URL") for d in sources if isinstance(d, dict)]
        if root.as_uri() not in urls:
            raise io.OutputError(
                f"{out}: is the derivative of {urls[0] if urls else 'another dataset'}, not of "
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
    publish_reference: bool = True,
    seed: int = fill.DEFAULT_SEED,
) -> list[str]:
    """Publish one session: defaced images (derivative or in place), face masks, sidecars.

    Derivative files appear all or none (a failure removes those written). In place, the
    defaced images replace the raw ones last, each after its checksum is in the manifest, with
    the raw file's mode. Overwriting was allowed before the run (``plan_derivatives``,
    ``prepare_in_place``). Returns the paths written.
    """
    root, out = Path(bids_dir).resolve(), Path(output_dir).resolve()
    provenance = {
        "Description": f"defaced by mideface-nipype {__version__} (MiDeFace), "
        f"face mask from {Path(reference).name}",
        "DefaceSeed": seed,
    }
    images = [(reference, defaced, face_mask)] if publish_reference else []
    images += zip(others, other_defaced, other_face_masks, strict=True)
    sources = [out / ORIGINALS_DIR / rel if in_place else root / rel for rel, _, _ in images]
    work = [defaced, face_mask, exclusion_mask, *other_defaced, *other_face_masks]
    publisher = io.Publisher([*sources, *work], force=True)
    try:
        for rel, image, mask in images:
            source_uri = f"bids:raw:{rel}"
            if not in_place:
                _copy(publisher, image, out / rel)
                meta = inherited_metadata(root, rel) | {"Sources": [source_uri]} | provenance
                _write_json(publisher, meta, out / sidecar_path(rel))
            mask_path = out / face_mask_name(rel, reference=rel == reference)
            _copy(publisher, mask, mask_path)
            mask_meta = {
                "Type": "Face",
                "Sources": [source_uri],
                "Description": FACE_MASK_DESCRIPTION,
            }
            _write_json(publisher, mask_meta, out / sidecar_path(str(mask_path.relative_to(out))))
        if publish_reference:
            xmask_path = out / face_mask_name(reference, reference=True, desc="exclusion")
            _copy(publisher, exclusion_mask, xmask_path)
            xmask_meta = {
                "Type": "ROI",
                "Sources": [f"bids:raw:{reference}"],
                "Description": EXCLUSION_MASK_DESCRIPTION,
            }
            _write_json(publisher, xmask_meta, out / sidecar_path(str(xmask_path.relative_to(out))))
    except BaseException:
        publisher.rollback()
        raise
    written = [str(p) for p in publisher.written]
    if in_place:
        for rel, image, _ in images:
            _replace_raw(root, out, rel, image)
            written.append(str(root / rel))
    return written


def _replace_raw(root: Path, out: Path, rel: str, image: str) -> None:
    """Record the defaced image's checksum, then put it over the raw image (mode kept)."""
    manifest = read_manifest(out)
    record = manifest["images"][rel] if manifest else {}
    kept = out / ORIGINALS_DIR / rel
    if not (kept.is_file() and sha256(kept) == record.get("original_sha256")):
        raise io.OutputError(f"{kept}: the kept original of {rel} is missing; not replaced")
    record["defaced_sha256"] = sha256(image)
    _save_manifest(out, manifest)
    raw = root / rel
    _copy(io.Publisher([kept, image], force=True), image, raw, mode=_file_mode(raw))


def expected_outputs(
    session: Session, bids_dir: str | Path, output_dir: str | Path, *, in_place: bool
) -> list[Path]:
    """Every file a finished session writes (to check before the run, and to tell finished
    sessions from failed ones after it)."""
    root, out = Path(bids_dir).resolve(), Path(output_dir).resolve()
    paths = []
    for rel in session.published:
        if in_place:
            paths.append(root / rel)
        else:
            paths += [out / rel, out / sidecar_path(rel)]
        mask = face_mask_name(rel, reference=rel == session.reference)
        paths += [out / mask, out / sidecar_path(mask)]
    if session.publish_reference:
        xmask = face_mask_name(session.reference, reference=True, desc="exclusion")
        paths += [out / xmask, out / sidecar_path(xmask)]
    return paths
