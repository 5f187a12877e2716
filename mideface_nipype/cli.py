"""``mideface``: deface a head MRI (FreeSurfer-compatible options where they make sense)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
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
_ERROR_TYPES = ("InputError", "NoHeadError", "RegistrationError", "ValueError")

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

examples
  mideface --i sub-01_T1w.nii.gz --o sub-01_T1w_defaced.nii.gz
  mideface --i T1.mgz --odir deface/ --forehead --seed 7
  mideface --check sub-01_T1w_defaced.nii.gz      # prints 1 if defaced by mideface
  mideface --demo demo_out                         # deface the bundled sample head
"""


def build_parser() -> argparse.ArgumentParser:
    from mideface_nipype import bracket, fill, workflows

    p = argparse.ArgumentParser(
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
        type=int,
        default=fill.STAT_FRAME,
        help="frame of a 4-D volume used for the fill statistics (default 0)",
    )
    how.add_argument(
        "--seed",
        type=int,
        default=fill.DEFAULT_SEED,
        help=f"random seed of the noise fill (default {fill.DEFAULT_SEED})",
    )

    prot = p.add_argument_group("protection")
    samseg_default = workflows.DEFAULT_XMASK_SOURCE == "segment"
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
    misc.add_argument("--threads", type=int, default=1, help="processes for Nipype (MultiProc)")
    misc.add_argument(
        "--check",
        metavar="VOL",
        nargs="+",
        help="print 1 if VOL carries the mideface code, else 0 (optionally "
        "also written to a file given as second argument)",
    )
    misc.add_argument("--log", metavar="FILE", help="log file (default <odir>/log/mideface.log)")
    misc.add_argument("-v", "--verbose", action="store_true", help="log Nipype's messages too")
    misc.add_argument("--version", action="version", version=f"mideface-nipype {__version__}")
    return p


def _setup_logging(log_file: Path | None, verbose: bool) -> None:
    fmt = logging.Formatter("%(asctime)s mideface: %(message)s", "%H:%M:%S")
    LOGGER.setLevel(logging.INFO)
    LOGGER.handlers.clear()
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
    from mideface_nipype.io import split_suffix

    stem, suffix = split_suffix(Path(path).name)
    return f"{stem}_defaced{suffix}"


def _publish(src: str, dst: Path) -> None:
    """Put a finished file at ``dst`` atomically, converting the volume format if it differs."""
    from mideface_nipype import io

    dst.parent.mkdir(parents=True, exist_ok=True)
    if io.split_suffix(dst)[1] != io.split_suffix(src)[1]:
        import nibabel as nib

        io.save_atomic(nib.load(src), dst)
        return
    io.copy_atomic(src, dst)


def _resolve_outputs(args, in_file: Path) -> tuple[Path, Path | None, str]:
    from mideface_nipype.io import InputError, split_suffix

    _, in_suffix = split_suffix(in_file)
    suffix = FORMATS[args.fmt] if args.fmt else in_suffix
    odir = Path(args.odir) if args.odir else None
    if args.o:
        out = Path(args.o)
        if not split_suffix(out)[1]:
            if odir is None:  # FreeSurfer: an --o without a volume suffix is an output folder
                odir, out = out, out / f"defaced{suffix}"
            else:
                raise InputError(f"{out}: unknown volume format; end it with .nii.gz, .nii or .mgz")
    elif odir is not None:
        out = odir / f"defaced{suffix}"
    else:
        raise InputError("give an output: --o VOL or --odir DIR")
    written = [out] + ([Path(args.facemask)] if args.facemask else [])
    for path in written:
        if path.resolve() == in_file.resolve():
            raise InputError(f"{path}: the output would overwrite the input")
        _check_writable(path)
    if odir is not None:
        _check_writable(odir / "stats.json")
    return out, odir, suffix


def _check_writable(path: Path) -> None:
    """Refuse, before any work, an output that is a folder, lies under a file, or is read-only."""
    from mideface_nipype.io import InputError

    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a file the output can be written to")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{path}: cannot be written: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{path}: the output folder {folder} is not writable")


def _options(args) -> dict:
    """The command line's settings, for the report and the sidecars."""
    return {k: v for k, v in sorted(vars(args).items()) if v is not None and v != []}


def _write_sidecars(args, in_file: Path, out: Path, odir: Path | None, suffix: str, options):
    """BIDS-named inputs: a JSON sidecar (tool, version, options, face mask) by each output."""
    from mideface_nipype import report

    if args.facemask:
        face_mask = Path(args.facemask)
    else:
        face_mask = odir / f"face.mask{suffix}" if odir is not None else None
    pairs = [(in_file, out)] + [(Path(o), out.parent / _defaced_name(o)) for o in args.apply_to]
    for source, defaced in pairs:
        if report.is_bids_name(source):
            report.write_sidecar(
                defaced, options=options, face_mask_path=face_mask, source_path=source
            )


def run_check(paths: list[str]) -> int:
    from mideface_nipype import fill, io

    img = io.load_volume(paths[0])
    found = int(fill.check_code(io.stored_data(img)))
    print(found)
    if len(paths) > 1:
        io.write_text_atomic(f"{found}\n", paths[1])
    return 0


def run_apply(args) -> int:
    """FreeSurfer's ``--apply VOL FACEMASK REG OUT``."""
    import numpy as np

    from mideface_nipype import apply, io, register, report

    vol, facemask, reg, out = args.apply
    _setup_logging(Path(args.log) if args.log else None, args.verbose)
    img = io.load_volume(vol)
    mask_img = io.load_volume(facemask)
    if Path(out).resolve() == Path(vol).resolve():
        raise io.InputError(f"{out}: the output would overwrite the input")
    if reg == "regheader":
        matrix = None
    elif not Path(reg).is_file():
        raise io.InputError(f"{reg}: registration file not found")
    elif reg.endswith(".txt"):
        matrix = np.loadtxt(reg).reshape(4, 4)
    else:
        matrix = register.ants_transform_to_ras(reg)
    xmask = np.asarray(io.load_volume(args.xmask).dataobj) if args.xmask else None
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
    io.save_atomic(io.like(img, data, descrip=io.defaced_descrip()), out)
    if report.is_bids_name(vol):
        report.write_sidecar(out, options=_options(args), face_mask_path=facemask, source_path=vol)
    LOGGER.info("applied %s to %s -> %s (%d face voxels)", facemask, vol, out, stats.n1)
    return 0


def run(args) -> int:
    from nipype import config

    from mideface_nipype import io
    from mideface_nipype.workflows import init_mideface_wf, workflow_outputs

    in_file = Path(args.i)
    out, odir, suffix = _resolve_outputs(args, in_file)
    if args.pics and odir is None:
        raise io.InputError("--pics needs --odir DIR: the pictures and report.html go there")
    log_file = Path(args.log) if args.log else (odir / "log" / "mideface.log" if odir else None)
    _setup_logging(log_file, args.verbose)
    LOGGER.info("mideface-nipype %s: %s -> %s", __version__, in_file, out)
    for path in [in_file, *args.apply_to]:
        io.load_volume(path)  # fail early, with the file named, before any work
    if args.xmask:
        xmask_img = io.load_volume(args.xmask) if Path(args.xmask).exists() else None
        if xmask_img is None:
            raise io.InputError(f"{args.xmask}: file not found")
    fill_const = (0.0, 0.0) if args.fill_zero else args.fill_const
    ripple = args.ripple is not None
    workflow = init_mideface_wf(
        xmask_source="user" if args.xmask else ("segment" if args.samseg else "atlas"),
        ears=args.ears,
        forehead=args.forehead,
        back_of_head=args.back_of_head,
        ripple=ripple,
        seed=args.seed,
        fill_const=tuple(fill_const) if fill_const else None,
        other_contrasts=[str(Path(f).resolve()) for f in args.apply_to],
        regheader=args.regheader,
        pics=args.pics,
    )
    options = _options(args)
    workflow.get_node("report").inputs.options = options
    workflow.get_node("deface").inputs.stat_frame = args.statframe
    if ripple and args.ripple:
        workflow.get_node("bracket").inputs.ripple_amp_mm = args.ripple[0]
        if len(args.ripple) > 1:
            workflow.get_node("bracket").inputs.ripple_period_mm = args.ripple[1]
    workflow.inputs.inputnode.in_file = str(in_file.resolve())
    if args.xmask:
        workflow.inputs.inputnode.xmask = str(Path(args.xmask).resolve())
    if args.init_reg:
        workflow.inputs.inputnode.init_transform = str(Path(args.init_reg).resolve())

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mideface-"))
    workflow.base_dir = str(work.resolve())
    config.set("execution", "crashdump_dir", str(work.resolve()))
    start = time.perf_counter()
    try:
        plugin = "MultiProc" if args.threads > 1 else "Linear"
        plugin_args = {"n_procs": args.threads} if args.threads > 1 else {}
        graph = workflow.run(plugin=plugin, plugin_args=plugin_args)
        outputs = workflow_outputs(workflow, graph)
        _publish(outputs["out_file"], out)
        if args.facemask:
            _publish(outputs["face_mask"], Path(args.facemask))
        for other, defaced in zip(args.apply_to, outputs.get("other_out_files") or [], strict=True):
            _publish(defaced, out.parent / _defaced_name(other))
        if odir is not None:
            extra = {
                f"face.mask{suffix}": outputs["face_mask"],
                f"head.mask{suffix}": outputs["head_mask"],
                f"exclusion.mask{suffix}": outputs["exclusion_mask"],
                "subject_to_atlas.txt": outputs["transform"],
                "subject_to_atlas.mat": outputs["itk_transform"],
                "template.surf.gii": outputs["surface"],
                "distances.json": outputs["distances"],
                "stats.json": outputs["stats"],
            }
            if outputs.get("segmentation"):
                extra[f"seg{suffix}"] = outputs["segmentation"]
                extra["segmentation.png"] = outputs["segmentation_report"]
            extra["report.html"] = outputs["report"]
            if args.pics:
                extra.update({Path(src).name: src for src in outputs["pictures"]})
                extra["head.surf.gii"] = outputs["head_surface"]
                extra["head.defaced.surf.gii"] = outputs["defaced_surface"]
                extra["dist-to-face.func.gii"] = outputs["dist_to_face"]
            for name, src in extra.items():
                _publish(src, odir / name)
        _write_sidecars(args, in_file, out, odir, suffix, options)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    LOGGER.info("done in %.1f s: %s", time.perf_counter() - start, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check:
        try:
            return run_check(args.check)
        except Exception as err:  # noqa: BLE001 - one clear line for any failure
            print(f"mideface: error: {_error_line(err)}", file=sys.stderr)
            return 1
    if args.apply:
        try:
            return run_apply(args)
        except Exception as err:  # noqa: BLE001 - one clear line for any failure
            print(f"mideface: error: {_error_line(err)}", file=sys.stderr)
            return 1
    if args.demo:
        sample = resources.files("mideface_nipype.data") / DEMO_FILE
        args.i = str(sample)
        args.odir = args.demo
        args.o = None
    if not args.i:
        parser.print_usage(sys.stderr)
        print("mideface: error: --i (or --demo or --check) is required", file=sys.stderr)
        return 1
    try:
        return run(args)
    except KeyboardInterrupt:
        print("mideface: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one clear line for any failure
        message = _error_line(err)
        if args.i not in message:
            message = f"{args.i}: {message}"
        LOGGER.debug("failure", exc_info=True)
        print(f"mideface: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
