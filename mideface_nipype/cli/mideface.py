"""``mideface``: deface a head MRI (FreeSurfer-compatible options where they make sense)."""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import signal
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from mideface_nipype import __version__

LOGGER = logging.getLogger("mideface")

#: The bundled real sample head for ``--demo`` (BSD-2-Clause, see mideface_nipype/data/README.md).
DEMO_FILE = "dcmqa-xa30_T1w_2mm.nii.gz"
FORMATS = {"mgz": ".mgz", "nii": ".nii", "nii.gz": ".nii.gz"}
#: Our own error types, whose one-line message is what the user sees when a step fails.
_ERROR_TYPES = ("OutputError", "InputError", "NoHeadError", "RegistrationError", "ValueError")

EPILOG = """\
outputs
  --o FILE            the defaced volume (same grid, dtype, header and scaling as --i)
  --odir DIR          also keeps, in DIR: face.mask (0 untouched, 1 tissue under the template
                      face, 2 air under it, 3 tissue beyond it, 4 air beyond it), head.mask,
                      exclusion.mask, subject_to_atlas.txt (4x4 RAS) and .mat (ANTs),
                      template.surf.gii (the atlas face in subject mm), distances.json,
                      stats.json, report.html (warnings, statistics, options, versions,
                      timings; pictures with --pics) and log/mideface.log
  --pics              also in DIR: face-before.png, face-after.png, face-before+after.gif,
                      dist-to-face.png, slices.png, head.surf.gii, head.defaced.surf.gii,
                      dist-to-face.func.gii
  sub-*_*.nii[.gz]    a BIDS-named input also gets a JSON sidecar next to each defaced file
  every output        is refused if it is a file the run reads (also through a link) or, without
                      --force, exists; DIR's files appear together; a failed run removes what it
                      wrote (DIR/log/mideface.log keeps the error)

examples
  mideface --i sub-01_T1w.nii.gz --o sub-01_T1w_defaced.nii.gz
  mideface --i T1.mgz --odir deface/ --forehead --seed 7
  mideface --check sub-01_T1w_defaced.nii.gz      # prints 1 if defaced by mideface
  mideface --demo demo_out                         # deface the bundled sample head
"""


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 1 for a bad command line, like every other refusal."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _number(kind: type, low: float, *, inclusive: bool = True):
    """An argparse type: a ``kind`` number >= ``low`` (> ``low`` unless ``inclusive``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < low or (value == low and not inclusive) or value != value:
            relation = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {relation} {low}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from mideface_nipype.engine import bracket, exclusion, fill
    from mideface_nipype.utils import io

    p = _Parser(
        prog="mideface",
        description=(
            "Minimally invasive defacing of a head MRI (a reimplementation of FreeSurfer's "
            "MiDeFace). The head is segmented, an atlas face surface is registered to the "
            "subject, the true face is bracketed between inward and outward projections of "
            "that surface, and the bracket is filled with noise matched to tissue and "
            "background. Brain and eyes (the exclusion mask) are never modified."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io_group = p.add_argument_group("input and output")
    io_group.add_argument("--i", metavar="VOL", help="input volume (NIfTI or MGZ, 3-D or 4-D)")
    io_group.add_argument("--o", metavar="VOL", help="defaced output volume")
    io_group.add_argument("--odir", metavar="DIR", help="folder for the output and QA files")
    io_group.add_argument("--facemask", metavar="VOL", help="write the face mask (0-4) here")
    fmt = io_group.add_mutually_exclusive_group()
    for key in FORMATS:
        fmt.add_argument(
            f"--{key}",
            dest="fmt",
            action="store_const",
            const=key,
            help=f"with --odir and no --o: write {key} (default: the input's format)",
        )
    io_group.add_argument(
        "--apply-to",
        nargs="+",
        metavar="VOL",
        default=[],
        help="other contrasts of the same head, defaced with this face mask after a rigid "
        "registration to --i; written as <name>_defaced.<ext> beside the output",
    )
    io_group.add_argument(
        "--regheader",
        action="store_true",
        help="with --apply-to: the contrasts share --i's scanner space; no registration",
    )
    io_group.add_argument(
        "--apply",
        nargs=4,
        metavar=("VOL", "FACEMASK", "REG", "OUT"),
        help="deface VOL with an existing FACEMASK; REG is 'regheader', a 4x4 RAS text matrix "
        "(VOL mm -> FACEMASK mm) or an ITK/ANTs affine with VOL as the fixed image",
    )
    io_group.add_argument("--demo", metavar="DIR", help="deface the bundled sample head into DIR")
    io_group.add_argument("--work-dir", metavar="DIR", help="keep Nipype's working folder here")
    io_group.add_argument(
        "--force", action="store_true", help="overwrite existing outputs (never an input)"
    )
    io_group.add_argument(
        "--max-gb",
        type=_number(float, 0, inclusive=False),
        default=io.DEFAULT_MAX_GB,
        metavar="GB",
        help="refuse, from its header, a volume whose run would need more memory than this "
        f"(default {io.DEFAULT_MAX_GB:g})",
    )

    what = p.add_argument_group("what to deface")
    what.add_argument(
        "--ears", dest="ears", action="store_true", default=True, help="deface the ears (default)"
    )
    what.add_argument("--no-ears", dest="ears", action="store_false", help="leave the ears")
    what.add_argument("--forehead", action="store_true", help="deface the forehead (risks brain)")
    what.add_argument("--no-forehead", dest="forehead", action="store_false")
    what.add_argument("--back-of-head", action="store_true", help="deface the back of the head")
    what.add_argument("--no-back-of-head", dest="back_of_head", action="store_false")

    how = p.add_argument_group("how to fill")
    how.add_argument(
        "--fill-const",
        nargs=2,
        type=float,
        metavar=("IN", "OUT"),
        help="fill with constants instead of noise (inside, outside the template)",
    )
    how.add_argument("--fill-zero", "--zero", action="store_true", help="same as --fill-const 0 0")
    how.add_argument(
        "--ripple",
        nargs="*",
        type=float,
        metavar="AMP PERIOD",
        help=f"ripple the template surface (default amplitude "
        f"{bracket.RIPPLE_AMP_MM} mm, period {bracket.RIPPLE_PERIOD_MM} mm)",
    )
    how.add_argument(
        "--statframe",
        type=_number(int, 0),
        default=fill.STAT_FRAME,
        help="frame of a 4-D volume used for the fill statistics (default 0)",
    )
    how.add_argument(
        "--seed",
        type=_number(int, 0),
        default=fill.DEFAULT_SEED,
        help=f"random seed of the noise fill (default {fill.DEFAULT_SEED})",
    )

    prot = p.add_argument_group("protection")
    samseg_default = exclusion.DEFAULT_XMASK_SOURCE == "segment"
    prot.add_argument(
        "--samseg",
        dest="samseg",
        action="store_true",
        default=samseg_default,
        help="exclusion mask from the SAMSEG-style segmentation of this head: brain, skull, "
        "eyes" + (" (default)" if samseg_default else ""),
    )
    prot.add_argument(
        "--no-samseg",
        dest="samseg",
        action="store_false",
        help="exclusion mask from the atlas brain and eyes only, through the registration"
        + ("" if samseg_default else " (default)"),
    )
    prot.add_argument(
        "--xmask",
        metavar="VOL",
        help="exclusion mask on the input grid: voxels > 0.5 are never modified",
    )
    prot.add_argument(
        "--init-reg",
        metavar="TXT",
        help="4x4 RAS matrix (subject -> atlas mm) to start the registration from",
    )

    qa = p.add_argument_group("quality control")
    qa.add_argument(
        "--pics",
        action="store_true",
        help="with --odir: pictures of the skin before and after defacing in the atlas pose "
        "(PNG, GIF), outlined slices, the skin surfaces and the dist-to-face check, all in "
        "DIR and in DIR/report.html",
    )

    misc = p.add_argument_group("other")
    misc.add_argument(
        "--threads", type=_number(int, 1), default=1, help="processes for Nipype (MultiProc)"
    )
    misc.add_argument(
        "--check",
        metavar="VOL",
        nargs="+",
        help="print 1 if VOL carries the mideface code, else 0 (optionally "
        "also written to a text file, not a volume, given as second argument)",
    )
    misc.add_argument("--log", metavar="FILE", help="log file (default <odir>/log/mideface.log)")
    misc.add_argument("-v", "--verbose", action="store_true", help="log Nipype's messages too")
    misc.add_argument("--version", action="version", version=f"mideface-nipype {__version__}")
    return p


#: ``--odir`` files: name ("{s}" is the volume suffix) -> workflow output.
ODIR_FILES = {
    "face.mask{s}": "face_mask",
    "head.mask{s}": "head_mask",
    "exclusion.mask{s}": "exclusion_mask",
    "subject_to_atlas.txt": "transform",
    "subject_to_atlas.mat": "itk_transform",
    "template.surf.gii": "surface",
    "distances.json": "distances",
    "stats.json": "stats",
    "report.html": "report",
}
#: More ``--odir`` files with the segmentation exclusion mask.
SEGMENT_FILES = {"seg{s}": "segmentation", "segmentation.png": "segmentation_report"}
#: More ``--odir`` files with ``--pics`` (besides the pictures, ``report.PICTURES``).
PICS_FILES = {
    "head.surf.gii": "head_surface",
    "head.defaced.surf.gii": "defaced_surface",
    "dist-to-face.func.gii": "dist_to_face",
}


def _setup_logging(log_file: Path | None, verbose: bool) -> None:
    fmt = logging.Formatter("%(asctime)s mideface: %(message)s", "%H:%M:%S")
    LOGGER.setLevel(logging.INFO)
    _close_logging()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    LOGGER.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        LOGGER.addHandler(handler)
    from nipype import config
    from nipype import logging as nlogging

    config.set("execution", "crashfile_format", "txt")
    config.set("execution", "stop_on_first_crash", "true")
    config.set("execution", "remove_unnecessary_outputs", "false")
    # Nipype's own messages (and its tracebacks of a failed node) only with --verbose; without
    # it the failure is reported as one line naming the file and the problem
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        nlogging.getLogger(name).setLevel(logging.INFO if verbose else logging.CRITICAL)


def _close_logging() -> None:
    for handler in LOGGER.handlers:
        handler.close()
    LOGGER.handlers.clear()


def _log_error(message: str) -> None:
    """The error line also in the log file (the console gets it from ``main``)."""
    record = LOGGER.makeRecord(
        LOGGER.name, logging.ERROR, __file__, 0, "error: %s", (message,), None
    )
    for handler in LOGGER.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _error_line(err: BaseException) -> str:
    """Our own error message as one line, also when it comes inside a Nipype crash report."""
    text = str(err)
    if type(err).__name__ in _ERROR_TYPES or isinstance(err, OSError):
        return " ".join(text.split())
    for kind in _ERROR_TYPES:
        found = re.findall(rf"{kind}: (.+)", text)
        if found:
            return found[-1].strip()
    return text.strip().splitlines()[-1] if text.strip() else type(err).__name__


def _defaced_name(path: str) -> str:
    """``sub-01_T2w.nii.gz`` -> ``sub-01_T2w_defaced.nii.gz`` (the --apply-to name rule)."""
    from mideface_nipype.utils.io import split_suffix

    stem, suffix = split_suffix(Path(path).name)
    return f"{stem}_defaced{suffix}"


def _resolve_outputs(args, in_file: Path) -> tuple[Path, Path | None, str]:
    """(defaced volume, output folder or None, volume suffix); refuses an unusable ``--o``."""
    from mideface_nipype.utils.io import OutputError, split_suffix

    _, in_suffix = split_suffix(in_file)
    suffix = FORMATS[args.fmt] if args.fmt else in_suffix
    odir = Path(args.odir) if args.odir else None
    if args.o:
        out = Path(args.o)
        if not split_suffix(out)[1]:
            if odir is not None or out.suffix:
                raise OutputError(
                    f"{out}: unknown volume format; end it with .nii.gz, .nii or .mgz (only a "
                    "name without any suffix, and without --odir, is taken as an output folder)"
                )
            odir, out = out, out / f"defaced{suffix}"  # FreeSurfer: --o without suffix = folder
    elif odir is not None:
        out = odir / f"defaced{suffix}"
    else:
        raise OutputError("give an output: --o VOL or --odir DIR")
    return out, odir, suffix


def _planned_outputs(args, in_file: Path, out: Path, odir: Path | None, suffix: str) -> list:
    """Every file the run will write, to check before any work."""
    from mideface_nipype.reports import report

    planned = [out] + ([Path(args.facemask)] if args.facemask else [])
    planned += [out.parent / _defaced_name(o) for o in args.apply_to]
    planned += [report.sidecar_path(defaced) for _, defaced in _sidecar_pairs(args, in_file, out)]
    if odir is not None:
        names = dict(ODIR_FILES)
        if args.samseg and not args.xmask:
            names.update(SEGMENT_FILES)
        if args.pics:
            names.update(PICS_FILES)
            names.update(dict.fromkeys(report.PICTURES))
        planned += [odir / name.format(s=suffix) for name in names]
    return planned


def _sidecar_pairs(args, in_file: Path, out: Path) -> list[tuple[Path, Path]]:
    """(source, defaced) of the BIDS-named inputs, which get a JSON sidecar."""
    from mideface_nipype.reports import report

    pairs = [(in_file, out)] + [(Path(o), out.parent / _defaced_name(o)) for o in args.apply_to]
    return [(source, defaced) for source, defaced in pairs if report.is_bids_name(source)]


def _options(args) -> dict:
    """The command line's settings, for the report and the sidecars."""
    return {k: v for k, v in sorted(vars(args).items()) if v is not None and v != []}


def _validate_inputs(args) -> list[Path]:
    """Read every input's header and data now (size first), so a bad one is refused before any
    work; return every file the run reads."""
    from mideface_nipype.reports import report
    from mideface_nipype.utils import io

    volumes = [Path(args.i), *map(Path, args.apply_to)]
    img = io.load_volume(volumes[0], max_gb=args.max_gb)
    for path in volumes[1:]:
        io.load_volume(path, max_gb=args.max_gb)
    reads = volumes + [report.sidecar_path(v) for v in volumes]
    if args.xmask:
        xmask = io.load_volume(args.xmask, max_gb=args.max_gb)
        if xmask.shape[:3] != img.shape[:3]:
            raise io.InputError(
                f"{args.xmask}: the exclusion mask has shape {xmask.shape[:3]}, not the input's "
                f"grid {img.shape[:3]}"
            )
        reads.append(Path(args.xmask))
    if args.init_reg:
        io.load_matrix(args.init_reg)
        reads.append(Path(args.init_reg))
    n_frames = img.shape[3] if len(img.shape) > 3 else 1
    if args.statframe >= n_frames:
        raise io.InputError(
            f"{args.i}: --statframe {args.statframe} is beyond its {n_frames} frame(s)"
        )
    return reads


def run_check(args) -> int:
    """FreeSurfer's ``--check VOL [OUTFILE]``: print (and write) 1 if VOL carries the code."""
    from mideface_nipype.engine import fill
    from mideface_nipype.utils import io

    if len(args.check) > 2:
        raise io.InputError(
            f"--check takes one volume and an optional output file, not {len(args.check)} files"
        )
    vol, outfile = Path(args.check[0]), (Path(args.check[1]) if len(args.check) > 1 else None)
    publisher = io.Publisher([vol], force=args.force)
    if outfile is not None:
        if io.split_suffix(outfile)[1]:
            raise io.OutputError(
                f"{outfile}: --check writes 0 or 1 to a text file, not a volume; refusing this "
                "volume name"
            )
        publisher.check(outfile)
    found = int(fill.check_code(io.stored_data(io.load_volume(vol, max_gb=args.max_gb))))
    print(found)
    if outfile is not None:
        publisher.write_text(f"{found}\n", outfile)
    return 0


def run_apply(args) -> int:
    """FreeSurfer's ``--apply VOL FACEMASK REG OUT``."""
    import numpy as np

    from mideface_nipype.engine import apply, register
    from mideface_nipype.reports import report
    from mideface_nipype.utils import io

    vol, facemask, out = Path(args.apply[0]), Path(args.apply[1]), Path(args.apply[3])
    reg = args.apply[2]
    reads = [vol, facemask, report.sidecar_path(vol)]
    reads += ([] if reg == "regheader" else [Path(reg)]) + (
        [Path(args.xmask)] if args.xmask else []
    )
    publisher = io.Publisher(reads, force=args.force)
    if not io.split_suffix(out)[1]:
        raise io.OutputError(f"{out}: unknown volume format; end it with .nii.gz, .nii or .mgz")
    sidecar = report.is_bids_name(vol)
    publisher.check_all([out] + ([report.sidecar_path(out)] if sidecar else []))
    img = io.load_volume(vol, max_gb=args.max_gb)
    mask_img = io.load_volume(facemask, max_gb=args.max_gb)
    if reg == "regheader":
        matrix = None
    elif reg.endswith(".txt"):
        matrix = io.load_matrix(reg)
    elif not Path(reg).is_file():
        raise io.InputError(f"{reg}: registration file not found")
    else:
        matrix = register.ants_transform_to_ras(reg)
    xmask = np.asarray(io.load_volume(args.xmask).dataobj) if args.xmask else None
    with io.locked(out, "output"):
        _setup_logging(Path(args.log) if args.log else None, args.verbose)
        fill_const = (0.0, 0.0) if args.fill_zero else args.fill_const
        data, _, stats = apply.apply_face_mask(
            io.stored_data(img),
            img.affine,
            np.asarray(mask_img.dataobj),
            mask_img.affine,
            target_to_mask=matrix,
            xmask=xmask,
            seed=args.seed,
            fill_const=io.to_stored(img, fill_const) if fill_const else None,
            stat_frame=args.statframe,
        )
        try:
            publisher.save_volume(io.like(img, data, descrip=io.defaced_descrip()), out)
            if sidecar:
                text = report.sidecar_text(
                    out, options=_options(args), face_mask_path=facemask, source_path=vol
                )
                publisher.write_text(text, report.sidecar_path(out))
        except BaseException:
            publisher.rollback()
            raise
    LOGGER.info("applied %s to %s -> %s (%d face voxels)", facemask, vol, out, stats.n1)
    return 0


def _run_workflow(args, in_file: Path, work: Path) -> dict:
    """Run the defacing graph (the one ``mideface_nipype.deface`` runs) in ``work``."""
    from mideface_nipype.workflows.base import run_mideface_wf

    fill_const = (0.0, 0.0) if args.fill_zero else args.fill_const
    ripple = {}
    if args.ripple:
        ripple = dict(zip(("ripple_amp_mm", "ripple_period_mm"), args.ripple, strict=False))
    return run_mideface_wf(
        in_file,
        work,
        xmask=args.xmask,
        init_transform=args.init_reg,
        n_procs=args.threads,
        xmask_source="user" if args.xmask else ("segment" if args.samseg else "atlas"),
        ears=args.ears,
        forehead=args.forehead,
        back_of_head=args.back_of_head,
        ripple=args.ripple is not None,
        **ripple,
        seed=args.seed,
        fill_const=tuple(fill_const) if fill_const else None,
        stat_frame=args.statframe,
        other_contrasts=[str(Path(f).resolve()) for f in args.apply_to],
        regheader=args.regheader,
        pics=args.pics,
        report_options=_options(args),
    )


def _publish_outputs(publisher, args, outputs: dict, in_file: Path, out, odir, suffix) -> None:
    """Every file of the run, through ``publisher``; the ``--odir`` files appear together."""
    from mideface_nipype.reports import report

    with publisher.staged(odir):
        publisher.copy(outputs["out_file"], out)
        if args.facemask:
            publisher.copy(outputs["face_mask"], Path(args.facemask))
        for other, defaced in zip(args.apply_to, outputs.get("other_out_files") or [], strict=True):
            publisher.copy(defaced, out.parent / _defaced_name(other))
        if odir is not None:
            names = dict(ODIR_FILES)
            if outputs.get("segmentation"):
                names.update(SEGMENT_FILES)
            if args.pics:
                names.update(PICS_FILES)
                for picture in outputs["pictures"]:
                    publisher.copy(picture, odir / Path(picture).name)
            for name, key in names.items():
                publisher.copy(outputs[key], odir / name.format(s=suffix))
        if args.facemask:
            face_mask = Path(args.facemask)
        else:
            face_mask = odir / f"face.mask{suffix}" if odir is not None else None
        for source, defaced in _sidecar_pairs(args, in_file, out):
            text = report.sidecar_text(
                defaced, options=_options(args), face_mask_path=face_mask, source_path=source
            )
            publisher.write_text(text, report.sidecar_path(defaced))


def run(args) -> int:
    from mideface_nipype.utils import io

    in_file = Path(args.i)
    out, odir, suffix = _resolve_outputs(args, in_file)
    if args.pics and odir is None:
        raise io.InputError("--pics needs --odir DIR: the pictures and report.html go there")
    publisher = io.Publisher(_validate_inputs(args), force=args.force)
    publisher.check_all(_planned_outputs(args, in_file, out, odir, suffix))
    log_file = Path(args.log) if args.log else (odir / "log" / "mideface.log" if odir else None)
    if log_file is not None:
        publisher.refuse_reads(log_file)
    work = Path(args.work_dir) if args.work_dir else None
    with (
        io.maybe_locked(work, "work folder"),
        io.locked(odir if odir is not None else out, "output folder" if odir else "output"),
    ):
        _setup_logging(log_file, args.verbose)
        LOGGER.info("mideface-nipype %s: %s -> %s", __version__, in_file, out)
        if args.o and odir is not None and not args.odir:
            LOGGER.info("--o %s has no volume suffix: it is the output folder", args.o)
        start = time.perf_counter()
        scratch = work or Path(tempfile.mkdtemp(prefix="mideface-"))
        try:
            outputs = _run_workflow(args, in_file, scratch)
            _publish_outputs(publisher, args, outputs, in_file, out, odir, suffix)
        except BaseException:
            publisher.rollback()
            raise
        finally:
            if work is None:
                shutil.rmtree(scratch, ignore_errors=True)
        LOGGER.info("done in %.1f s: %s", time.perf_counter() - start, out)
    if odir is not None:
        print(f"mideface: open {(odir / 'report.html').resolve()} to see what was done")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        sample = resources.files("mideface_nipype.data") / DEMO_FILE
        args.i = str(sample)
        args.odir = args.demo
        args.o = None
    command = run_check if args.check else run_apply if args.apply else run
    if command is run and not args.i:
        parser.print_usage(sys.stderr)
        print("mideface: error: --i (or --demo or --check) is required", file=sys.stderr)
        return 1
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a killed job removes its outputs too
    _SIGNALLED.clear()
    try:
        return command(args)
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as err:  # noqa: BLE001 - one clear line for any failure
        if _SIGNALLED:  # Nipype reports the interrupt of a node as its crash
            return _interrupted()
        message = _error_line(err)
        if command is run:  # name --i unless the message names the file that failed
            named = [args.i, *(str(Path(f).resolve()) for f in [args.i, *args.apply_to])]
            if not any(path in message for path in named):
                message = f"{args.i}: {message}"
        LOGGER.debug("failure", exc_info=True)
        _log_error(message)
        print(f"mideface: error: {message}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        _close_logging()


#: The signal that stopped this run, if any.
_SIGNALLED: list[str] = []


def _interrupt(signum: int, _frame) -> None:
    """SIGTERM (a job scheduler's kill) as Ctrl-C: the run removes what it wrote, then exits."""
    _SIGNALLED.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(_SIGNALLED[-1])


def _interrupted() -> int:
    _log_error("interrupted; no output written")
    print("mideface: interrupted; no output written", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
