"""``mideface-audit``: which images of a dataset still show a face, before it is published."""

from __future__ import annotations

import argparse
import base64
import fnmatch
import html
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mideface_nipype import __version__
from mideface_nipype.evaluation import audit
from mideface_nipype.reports.report import STYLE
from mideface_nipype.reports.slices import save_png
from mideface_nipype.utils import io
from mideface_nipype.utils.errors import MidefaceError
from mideface_nipype.utils.threads import pin_itk_threads

#: Exit codes: no face in view, at least one image flagged, usage error or unreadable input.
EXIT_CLEAN, EXIT_FLAGGED, EXIT_ERROR = 0, 1, 2
#: Columns of ``audit.tsv``.
TSV_COLUMNS = (
    "path",
    "verdict",
    "reason",
    "flagged",
    "views_with_face",
    *(f"score_{yaw:+g}" for yaw in audit.YAWS_DEG),
    "face_in_box",
    "nose_without_skin",
    "head_dice",
    "seconds",
)
#: The verdict of an image that could be read but not judged (no head in it, ...).
NOT_AUDITED = "not audited"
TSV_NAME = "audit.tsv"
HTML_NAME = "audit.html"
#: BIDS suffixes in ``anat/`` that are not images of a head (BIDS's own defacing masks).
NON_HEAD_SUFFIXES = ("defacemask",)

EPILOG = f"""\
verdicts (one per image)
  {audit.FACE_IN_VIEW:<17} FLAGGED: a face with landmarks is detected in >= {audit.MIN_VIEWS} of \
the skin renders
                    (front, +-30 deg) where the atlas face lies. A stamped image is examined
                    too (a mask applied through a wrong registration is stamped as well):
                    "{audit.STAMPED}" when a face is found, "{audit.STAMPED_NOSE}"
                    when it carries our code and the atlas nose still has skin
  {audit.DEFACED:<17} {audit.BY_MIDEFACE}: provenance code or descrip stamp of mideface-nipype \
(or MiDeFace),
                    and not flagged
                    {audit.ZEROED}: no skin where the face should be (zeroed voxels, a cutting \
plane)
                    {audit.NOISE}: skin over the face, but no face is found
  {audit.OUT_OF_VIEW:<17} the face lies (partly) outside the image box and none is found
  {NOT_AUDITED:<17} the image could not be judged (no head in it, ...): exit status {EXIT_ERROR}

PATH may be a volume (.nii, .nii.gz, .mgz, .mgh; also .nii.bz2, an Analyze/NIfTI pair by its
.hdr, MINC .mnc), a folder (every volume below it) or a BIDS
dataset (a folder with dataset_description.json: every image in sub-*/[ses-*/]anat/, minus
.bidsignore). Each image takes ~15-40 s (atlas registration, renders, face detection), images
with the provenance code too.

outputs (in --out-dir)
  {TSV_NAME}     one row per image: {", ".join(TSV_COLUMNS)}
  {HTML_NAME}    the table, the renders of every flagged image and of faces cut by the box
                (self-contained page: pictures embedded, no script)

exit status: {EXIT_CLEAN} no image flagged, {EXIT_FLAGGED} at least one flagged, \
{EXIT_ERROR} usage error, unreadable input (checked before any work),
  missing 'eval' extra, or an image not audited (the others are, and the outputs written)
"""


class UsageError(ValueError):
    """A problem with the command's inputs; one line naming the file."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mideface-audit",
        description="Find the images that still show a face: skin renders, face detection and "
        "the atlas face region, whichever tool (or none) defaced them. Needs the 'eval' extra "
        "(pip install 'mideface-nipype[eval]').",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="volumes, folders, BIDS")
    p.add_argument(
        "--out-dir",
        "-o",
        type=Path,
        default=Path("mideface-audit"),
        help="folder for audit.tsv and audit.html (default: ./mideface-audit)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


# ---------------------------------------------------------------- finding the images


def is_volume(path: Path) -> bool:
    return path.is_file() and io.is_volume_name(path.name)


def _bidsignore(root: Path) -> list[str]:
    ignore = root / ".bidsignore"
    if not ignore.is_file():
        return []
    lines = (line.strip() for line in ignore.read_text().splitlines())
    return [line.strip("/") for line in lines if line and not line.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Whether a dataset-relative path matches a ``.bidsignore`` pattern (gitignore-like)."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pat) or ("/" not in pat and fnmatch.fnmatch(part, pat))
        for pat in patterns
        for prefix, part in zip(prefixes, parts, strict=True)
    )


def bids_images(root: Path) -> list[Path]:
    """Every anatomical image of a BIDS dataset: ``sub-*/[ses-*/]anat/*.nii[.gz]``."""
    patterns = _bidsignore(root)
    found = []
    for anat in [*root.glob("sub-*/anat"), *root.glob("sub-*/ses-*/anat")]:
        for path in anat.iterdir():
            stem, suffix = io.split_suffix(path.name)
            if (
                suffix in (".nii", ".nii.gz")
                and path.is_file()
                and not path.name.startswith(".")
                and stem.rsplit("_", 1)[-1] not in NON_HEAD_SUFFIXES
                and not _ignored(path.relative_to(root).as_posix(), patterns)
            ):
                found.append(path)
    return sorted(found)


def folder_images(folder: Path) -> list[Path]:
    """Every volume below a folder, hidden files and folders left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if is_volume(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def find_images(paths: list[Path]) -> list[Path]:
    """The images named by the command's PATHs, in order, each once."""
    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            bids = (path / "dataset_description.json").is_file()
            found = bids_images(path) if bids else folder_images(path)
            if not found:
                what = "anatomical images in sub-*/[ses-*/]anat/" if bids else "volume files"
                raise UsageError(f"{path}: no {what} found")
            images += found
        elif path.exists() and not is_volume(path):
            formats = ", ".join((*io.VOLUME_SUFFIXES, *io.READ_ONLY_SUFFIXES))
            raise UsageError(f"{path}: not a volume ({formats}) or a folder")
        else:
            images.append(path)  # a missing file is named by load_volume's check
    return list(dict.fromkeys(images))


# ---------------------------------------------------------------- outputs


def _number(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def tsv_row(result: audit.AuditResult) -> list[str]:
    scores = {d.yaw_deg: d.score for d in result.detections}
    return [
        result.path,
        result.verdict,
        result.reason,
        "yes" if result.flagged else "no",
        str(result.views_with_face),
        *(_number(scores.get(yaw, float("nan"))) for yaw in audit.YAWS_DEG),
        _number(result.face_in_box),
        _number(result.nose_without_skin),
        _number(result.head_dice),
        _number(result.seconds, 1),
    ]


def tsv_text(results: list[audit.AuditResult]) -> str:
    lines = ["\t".join(TSV_COLUMNS)] + ["\t".join(tsv_row(r)) for r in results]
    return "\n".join(lines) + "\n"


def terminal_table(results: list[audit.AuditResult]) -> str:
    """A fixed-width table: image, verdict, reason, views with a face, seconds."""
    header = ("image", "verdict", "reason", "faces", "s")
    rows = [
        (
            r.path,
            ("FLAGGED: " if r.flagged else "") + r.verdict,
            r.reason,
            f"{r.views_with_face}/{len(audit.YAWS_DEG)}" if r.detections else "-",
            _number(r.seconds, 1),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def _png_uri(picture) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        data = save_png(picture, Path(tmp) / "render.png").read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _figure(result: audit.AuditResult) -> str:
    """The three renders of an image side by side, with what was found in them."""
    views = ", ".join(f"{yaw:+g}°" for yaw in audit.YAWS_DEG)
    picture = np.concatenate([result.renders[yaw] for yaw in audit.YAWS_DEG], axis=1)
    what = f"{result.verdict}" + (f" ({result.reason})" if result.reason else "")
    return (
        f'<figure><img src="{_png_uri(picture)}" alt="{html.escape(result.path)}">'
        f"<figcaption>{html.escape(result.path)}: {html.escape(what)}; skin renders at {views}, "
        f"a face found in {result.views_with_face} of {len(audit.YAWS_DEG)}</figcaption></figure>"
    )


def html_page(results: list[audit.AuditResult]) -> str:
    """The table and the renders of every flagged image (and of faces cut by the box), as one
    page that opens offline."""
    flagged = [r for r in results if r.flagged]
    cut = [r for r in results if r.verdict == audit.OUT_OF_VIEW]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TSV_COLUMNS)
    body = "".join(
        f'<tr class="{"warn" if r.flagged else ""}">'
        + "".join(f"<td>{html.escape(c)}</td>" for c in tsv_row(r))
        + "</tr>"
        for r in results
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mideface-audit</title><style>{STYLE}</style></head><body>",
        "<h1>mideface-audit: faces left in view</h1>",
        f"<p>mideface-nipype {html.escape(__version__)}, "
        f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}: {len(results)} images, "
        f'<span class="{"warn" if flagged else "ok"}">{len(flagged)} flagged</span>.</p>',
        f"<table><tr>{head}</tr>{body}</table>",
    ]
    sections = (
        ("Flagged images", flagged),
        ("Face (partly) out of view: the part in view, to check by eye", cut),
    )
    for title, chosen in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if not chosen:
            parts.append('<p class="ok">none</p>')
        parts += [_figure(r) for r in chosen]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- the command


def _fail(message: str) -> int:
    print(f"mideface-audit: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        audit.check_eval_extra()
        images = find_images(args.paths)
        if args.out_dir.exists() and not args.out_dir.is_dir():
            raise UsageError(f"{args.out_dir}: --out-dir exists and is not a folder")
        for path in images:  # every input is checked before any work
            io.load_volume(path)
        # the report is rewritten on every audit, but never onto an image it reads
        publisher = io.Publisher(images, force=True)
        publisher.check_all([args.out_dir / TSV_NAME, args.out_dir / HTML_NAME])
    except (audit.MissingEvalExtra, UsageError, io.InputError) as err:
        return _fail(str(err))
    pin_itk_threads()
    results = []
    for k, path in enumerate(images, 1):
        try:
            result = audit.audit_image(io.load_volume(path), str(path))
        except (ValueError, RuntimeError) as err:  # no head, no skin: the others still count
            # the row names the image: its reason is the problem alone (a MidefaceError about
            # another file keeps that file's name)
            own = isinstance(err, MidefaceError) and err.path in (None, str(path))
            reason = " ".join((err.problem if own else str(err)).split())
            result = audit.AuditResult(str(path), NOT_AUDITED, reason)
        if result.verdict not in (audit.FACE_IN_VIEW, audit.OUT_OF_VIEW):
            result.renders.clear()  # the page shows only these images' renders
        results.append(result)
        if not args.quiet:
            why = f" ({result.reason})" if result.reason else ""
            print(
                f"[{k}/{len(images)}] {path}: {result.verdict}{why}, {result.seconds:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    try:
        publisher.write_text(tsv_text(results), args.out_dir / TSV_NAME)
        publisher.write_text(html_page(results), args.out_dir / HTML_NAME)
    except OSError as err:
        publisher.rollback()
        return _fail(f"{args.out_dir}: the report cannot be written ({err.strerror})")
    print(terminal_table(results))
    n_flagged = sum(r.flagged for r in results)
    print(
        f"{n_flagged} of {len(results)} images flagged; "
        f"{args.out_dir / TSV_NAME}, {args.out_dir / HTML_NAME}"
    )
    failed = [r for r in results if r.verdict == NOT_AUDITED]
    for r in failed:
        _fail(f"{r.path}: cannot be audited ({r.reason})")
    return EXIT_ERROR if failed else EXIT_FLAGGED if n_flagged else EXIT_CLEAN


if __name__ == "__main__":
    sys.exit(main())
