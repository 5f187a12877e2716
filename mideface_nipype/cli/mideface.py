"""``mideface``: deface a head MRI (FreeSurfer-compatible options where they make sense)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from mideface_nipype import __version__
from mideface_nipype.cli.common import (
    Parser,
    add_engine_options,
    add_max_gb_option,
    check_log,
    check_log_file,
    check_work_folder,
    close_logging,
    configure_nipype,
    engine_options,
    error_line,
    log_error,
    number,
    setup_logging,
    warn_mgh_rounding,
)
from mideface_nipype.utils.errors import carried_error

LOGGER = logging.getLogger("mideface_nipype.cli.mideface")  # also when run as __main__

#: The bundled real sample head for ``--demo`` (BSD-2-Clause, see mideface_nipype/data/README.md).
DEMO_FILE = "dcmqa-xa30_T1w_2mm.nii.gz"
FORMATS = {"mgz": ".mgz", "nii": ".nii", "nii.gz": ".nii.gz"}

EPILOG = """\
outputs
  --o FILE            the defaced volume (same grid, dtype, header and scaling as --i;
                      an .mgz holds the real values of scaled data, and float64 data as
                      float32, with a warning: .nii.gz keeps every voxel as it was)
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
  every output        is refused if it is a file the run reads (also through a link, and both
                      files of a .hdr/.img pair) or, without --force, exists; DIR's files appear
                      together; a failed run removes what it wrote (DIR/log/mideface.log keeps
                      the error)
  sharing             only the defaced volume is free of the face: face.mask (its tissue/air
                      labels trace the true skin), head.mask, seg, the pictures and the
                      surfaces of DIR hold the original face; keep them with the raw data

examples
  mideface --i sub-01_T1w.nii.gz --o sub-01_T1w_defaced.nii.gz
  mideface --i T1.mgz --odir deface/ --forehead --seed 7
  mideface --check sub-01_T1w_defaced.nii.gz      # prints 1 if defaced by mideface
  mideface --demo demo_out                         # deface the bundled sample head
"""


def build_parser() -> argparse.ArgumentParser:

    p = Parser(
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
    io_group.add_argument(
        "--i",
        metavar="VOL",
        help="input volume (NIfTI or MGZ, 3-D or 4-D; a format nibabel only reads, such as "
        "Analyze .hdr/.img, is written as .nii.gz)",
    )
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
            help=f"with --odir and no --o: write {key} (default: the input's format, or .nii.gz "
            "for one nibabel only reads)",
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
        help="deface VOL with an existing FACEMASK; REG is 'regheader', a FreeSurfer LTA (.lta, "
        "either direction, as FreeSurfer), a 4x4 RAS text matrix (.txt, VOL mm -> FACEMASK mm) "
        "or an ITK/ANTs affine (.mat) with VOL as the fixed image; a FACEMASK without air labels "
        "(mideface-bids's desc-face_dseg) is split at VOL's own head",
    )
    io_group.add_argument("--demo", metavar="DIR", help="deface the bundled sample head into DIR")
    io_group.add_argument("--work-dir", metavar="DIR", help="keep Nipype's working folder here")
    io_group.add_argument(
        "--force", action="store_true", help="overwrite existing outputs (never an input)"
    )
    add_max_gb_option(
        io_group, "refuse, from its header, a volume whose run would need more memory than this"
    )

    prot, _ = add_engine_options(
        p,
        pics_help="with --odir: pictures of the skin before and after defacing in the atlas pose "
        "(PNG, GIF), outlined slices, the skin surfaces and the dist-to-face check, all in DIR "
        "and in DIR/report.html",
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

    misc = p.add_argument_group("other")
    misc.add_argument(
        "--threads", type=number(int, 1), default=1, help="processes for Nipype (MultiProc)"
    )
    misc.add_argument(
        "--check",
        metavar="VOL",
        nargs="+",
        help="print 1 if VOL carries the mideface code, else 0 (optionally "
        "also written to a text file, not a volume, given as second argument)",
    )
    misc.add_argument(
        "--log",
        metavar="FILE",
        help="text log, appended to (default <odir>/log/mideface.log); never a volume name, "
        "a file the run reads or writes, or an existing file that is not text",
    )
    misc.add_argument("-v", "--verbose", action="store_true", help="log Nipype's messages too")
    misc.add_argument("--version", action="version", version=f"mideface-nipype {__version__}")
    return p


def _resolve_outputs(args, in_file: Path) -> tuple[Path, Path | None, str]:
    """(defaced volume, output folder or None, volume suffix); refuses an unusable ``--o``."""
    from mideface_nipype.utils.io import OutputError, derived_name_parts, split_suffix
    from mideface_nipype.workflows.outputs import DEFACED_FILE

    _, in_suffix = derived_name_parts(in_file)
    suffix = FORMATS[args.fmt] if args.fmt else in_suffix
    odir = Path(args.odir) if args.odir else None
    if args.o:
        out = Path(args.o)
        if not split_suffix(out)[1]:
            if odir is not None or out.suffix:
                raise OutputError(
                    "unknown volume format; end it with .nii.gz, .nii or .mgz (only a "
                    "name without any suffix, and without --odir, is taken as an output folder)",
                    path=out,
                )
            odir, out = out, out / DEFACED_FILE.format(s=suffix)  # FreeSurfer: a folder
    elif odir is not None:
        out = odir / DEFACED_FILE.format(s=suffix)
    else:
        raise OutputError("give an output: --o VOL or --odir DIR")
    return out, odir, suffix


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
    for k, path in enumerate(volumes[1:], start=1):
        io.load_volume(path, max_gb=args.max_gb)
        # one image twice (a link, another spelling of its path, the other file of its pair)
        # would be defaced twice, the second time through a registration to itself
        if twin := next((v for v in volumes[:k] if io.same_image(v, path)), None):
            raise io.InputError(
                f"is the same image as {twin}: an image is given once (--i defaces it, "
                "--apply-to takes the other contrasts)",
                path=path,
            )
    reads = volumes + [report.sidecar_path(v) for v in volumes]
    if args.xmask:
        xmask = io.load_volume(args.xmask, max_gb=args.max_gb)
        if xmask.shape[:3] != img.shape[:3]:
            raise io.InputError(
                f"the exclusion mask has shape {xmask.shape[:3]}, not the input's "
                f"grid {img.shape[:3]}",
                path=args.xmask,
            )
        reads.append(Path(args.xmask))
    if args.init_reg:
        io.load_matrix(args.init_reg)
        reads.append(Path(args.init_reg))
    n_frames = img.shape[3] if len(img.shape) > 3 else 1
    if args.statframe >= n_frames:
        raise io.InputError(
            f"--statframe {args.statframe} is beyond its {n_frames} frame(s)", path=args.i
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
                "--check writes 0 or 1 to a text file, not a volume; refusing this volume name",
                path=outfile,
            )
        publisher.check(outfile)
    found = int(fill.check_code(io.stored_data(io.load_volume(vol, max_gb=args.max_gb))))
    print(found)
    if outfile is not None:
        publisher.write_text(f"{found}\n", outfile)
    return 0


def run_apply(args) -> int:
    """FreeSurfer's ``--apply VOL FACEMASK REG OUT``: every input checked, then a graph of one
    ``ApplyFaceMask`` node and the sink that publishes ``OUT`` (``init_apply_wf``)."""
    import numpy as np

    from mideface_nipype.engine import register
    from mideface_nipype.reports import report
    from mideface_nipype.utils import bids, io, lta
    from mideface_nipype.workflows.base import init_apply_wf, run_workflow
    from mideface_nipype.workflows.outputs import Outputs

    vol, facemask, out = Path(args.apply[0]), Path(args.apply[1]), Path(args.apply[3])
    reg = args.apply[2]
    reads = [vol, facemask, report.sidecar_path(vol)]
    reads += ([] if reg == "regheader" else [Path(reg)]) + (
        [Path(args.xmask)] if args.xmask else []
    )
    if not io.split_suffix(out)[1]:
        raise io.OutputError("unknown volume format; end it with .nii.gz, .nii or .mgz", path=out)
    texts = {}
    if bids.is_bids_name(vol):
        texts[str(report.sidecar_path(out))] = report.sidecar_text(
            out, options=_options(args), face_mask_path=facemask, source_path=vol
        )
    outputs = Outputs(
        destinations={"out_file": [str(out)]},
        texts=texts,
        reads=tuple(str(p) for p in reads),
        force=args.force,
    )
    publisher = io.Publisher(reads, force=args.force)
    publisher.check_all(outputs.paths)
    if args.log:
        check_log_file(Path(args.log), publisher, outputs.paths)
    vol_img = io.load_volume(vol, max_gb=args.max_gb)
    mask_img = io.load_volume(facemask, max_gb=args.max_gb)
    if reg == "regheader":
        matrix = None
    elif reg.lower().endswith(".lta"):
        matrix = lta.vol_to_mask_ras(reg, vol_img, mask_img)
    elif reg.endswith(".txt"):
        matrix = io.load_matrix(reg)
    elif not Path(reg).is_file():
        raise io.InputError("registration file not found", path=reg)
    else:
        try:
            matrix = register.ants_transform_to_ras(reg)
        except Exception as err:  # scipy raises several kinds, and its words name no file
            raise io.InputError(
                "is not an ITK/ANTs affine (.mat); REG is 'regheader', a FreeSurfer LTA (.lta), "
                "a 4x4 RAS matrix (.txt) or an ITK/ANTs affine",
                path=reg,
            ) from err
    if args.xmask:
        io.load_volume(args.xmask)
    work = Path(args.work_dir) if args.work_dir else None
    with io.maybe_locked(work, "work folder"), io.locked(out, "output"):
        setup_logging("mideface", args.verbose, Path(args.log) if args.log else None)
        LOGGER.info("mideface-nipype %s: --apply %s %s -> %s", __version__, vol, facemask, out)
        check_log()
        warn_mgh_rounding([(vol, out)])
        configure_nipype(stop_on_first_crash=True)
        scratch = work or Path(tempfile.mkdtemp(prefix="mideface-"))
        try:
            transform = None
            if matrix is not None:  # the ITK/ANTs file as the RAS text the node reads
                transform = scratch / "vol_to_facemask.txt"
                np.savetxt(transform, matrix)
            fill_const = (0.0, 0.0) if args.fill_zero else args.fill_const
            workflow = init_apply_wf(
                in_file=vol.resolve(),
                face_mask=facemask.resolve(),
                outputs=outputs,
                transform=transform,
                xmask=Path(args.xmask).resolve() if args.xmask else None,
                seed=args.seed,
                fill_const=fill_const,
                stat_frame=args.statframe,
            )
            with io.naming_work_folder(scratch):
                graph = run_workflow(workflow, scratch)
            (node,) = [n for n in graph.nodes() if n.name == "apply_mask"]
            stats = json.loads(Path(node.result.outputs.out_stats).read_text())
        finally:
            if work is None:
                shutil.rmtree(scratch, ignore_errors=True)
    LOGGER.info("applied %s to %s -> %s (%d face voxels)", facemask, vol, out, stats["n1"])
    return 0


def build_workflow(args, in_file: Path, outputs):
    """The defacing graph of the command line ``args`` (the one ``mideface_nipype.deface``
    runs), its sink publishing ``outputs``."""
    from mideface_nipype.workflows.base import init_mideface_wf

    def resolved(path: str | None) -> Path | None:
        return Path(path).resolve() if path else None

    return init_mideface_wf(
        in_file=in_file.resolve(),
        xmask=resolved(args.xmask),
        init_transform=resolved(args.init_reg),
        **engine_options(args),
        other_contrasts=[str(Path(f).resolve()) for f in args.apply_to],
        regheader=args.regheader,
        report_options=_options(args),
        outputs=outputs,
    )


def run(args) -> int:
    """Check every input and output, build the graph, run it: its last node publishes."""
    from mideface_nipype.utils import io
    from mideface_nipype.workflows.base import run_workflow
    from mideface_nipype.workflows.outputs import odir_outputs

    in_file = Path(args.i)
    out, odir, suffix = _resolve_outputs(args, in_file)
    if args.pics and odir is None:
        raise io.InputError("--pics needs --odir DIR: the pictures and report.html go there")
    segmentation = engine_options(args)["xmask_source"] == "segment"  # refuses a bad option
    reads = _validate_inputs(args)
    outputs = odir_outputs(
        in_file,
        out_file=out,
        odir=odir,
        suffix=suffix,
        face_mask=args.facemask,
        other_files=args.apply_to,
        segmentation=segmentation,
        pics=args.pics,
        options=_options(args),
        reads=reads,
        force=args.force,
    )
    publisher = io.Publisher(reads, force=args.force)
    publisher.check_all(outputs.paths)
    log_file = Path(args.log) if args.log else (odir / "log" / "mideface.log" if odir else None)
    if log_file is not None:
        check_log_file(log_file, publisher, outputs.paths)
    work = Path(args.work_dir) if args.work_dir else None
    if work is not None and odir is not None:
        check_work_folder(work, {odir: "the output folder"})
    with (
        io.maybe_locked(work, "work folder"),
        io.locked(odir if odir is not None else out, "output folder" if odir else "output"),
    ):
        setup_logging("mideface", args.verbose, log_file)
        configure_nipype(stop_on_first_crash=True)
        LOGGER.info("mideface-nipype %s: %s -> %s", __version__, in_file, out)
        check_log()  # a log that cannot be written: the outputs could not be either
        others = outputs.destinations.get("other_out_files", [])
        warn_mgh_rounding([(in_file, out), *zip(map(Path, args.apply_to), others, strict=True)])
        if args.o and odir is not None and not args.odir:
            LOGGER.info("--o %s has no volume suffix: it is the output folder", args.o)
        start = time.perf_counter()
        scratch = work or Path(tempfile.mkdtemp(prefix="mideface-"))
        try:
            with io.naming_work_folder(scratch):
                run_workflow(build_workflow(args, in_file, outputs), scratch, n_procs=args.threads)
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
        message = error_line(err)
        found = carried_error(err)
        if command is run and (found is None or found.path is None):
            message = f"{args.i}: {message}"  # the input, unless the error names its file
        LOGGER.debug("failure", exc_info=True)
        log_error(message)
        print(f"mideface: error: {message}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        close_logging()


#: The signal that stopped this run, if any.
_SIGNALLED: list[str] = []


def _interrupt(signum: int, _frame) -> None:
    """SIGTERM (a job scheduler's kill) as Ctrl-C: the run removes what it wrote, then exits."""
    _SIGNALLED.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(_SIGNALLED[-1])


def _interrupted() -> int:
    log_error("interrupted; no output written")
    print("mideface: interrupted; no output written", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
