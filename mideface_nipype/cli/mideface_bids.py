"""``mideface-bids``: deface every session of a BIDS dataset (a BIDS App), locally or on SLURM."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from mideface_nipype import __version__
from mideface_nipype.cli.common import (
    Parser,
    add_engine_options,
    add_max_gb_option,
    check_work_folder,
    close_logging,
    configure_nipype,
    engine_options,
    error_line,
    number,
    setup_logging,
)

LOGGER = logging.getLogger("mideface_nipype.cli.mideface_bids")  # also as __main__

PLUGINS = ("Linear", "MultiProc", "SLURM", "SLURMGraph")
#: Seconds between two looks at the SLURM queue while SLURMGraph jobs run.
SLURM_POLL_S = 2.0
#: Seconds between two looks at local workers (Nipype's default, 2 s, suits a batch queue).
LOCAL_POLL_S = 0.2

EPILOG = """\
outputs (OUTPUT_DIR is a BIDS derivative dataset; README.md there says how to query it)
  dataset_description.json, README.md, .bidsignore
  sub-01/anat/sub-01_desc-defaced_T1w.nii.gz    the defaced image (+ .json: the raw sidecar
                                                 after inheritance, Sources, SkullStripped, ...)
  sub-01/anat/sub-01_desc-face_dseg.nii.gz      face mask of the T1w (+ .tsv labels 0-4, .json)
  sub-01/anat/sub-01_desc-faceT2w_dseg.nii.gz   the same mask carried onto the T2w's grid
  sub-01/anat/sub-01_desc-exclusion_mask.nii.gz voxels never modified (brain, eyes, skull)
  sub-01/anat/sub-01_from-T1w_to-mideface_mode-image_xfm.txt   T1w mm -> atlas mm (4x4 RAS)
  sub-01.html                                   the subject's report: each session's report
                                                 (sub-01/figures/) and pictures (--pics)
  with --in-place: the defaced images replace the raw ones in BIDS_DIR (same mode) and the raw
  images are kept in OUTPUT_DIR/sourcedata/ with mideface-manifest.json (checksums of each
  original and its defaced image); a rerun skips what is done and defaces only new raw data,
  keeping the earlier original in sourcedata/superseded/
  images already defaced (provenance code, descrip stamp, Defacing sidecar record) are skipped,
  and existing outputs are refused, unless --force

examples
  mideface-bids /data/ds /data/ds/derivatives/mideface participant --nprocs 2
  mideface-bids /data/ds /out participant --participant-label 01 02 --plugin SLURM \\
      --plugin-args '{"sbatch_args": "--partition=short --mem=4G"}' --work-dir /scratch/work
"""


def build_parser() -> argparse.ArgumentParser:

    p = Parser(
        prog="mideface-bids",
        description="Deface each subject/session of a BIDS dataset: the T1w with MiDeFace, and "
        "every other anatomical image of the session (T2w, FLAIR, PD, ...) with the T1w's face "
        "mask after a rigid registration. Nipype caches every step in the work folder, so a "
        "rerun after a crash or a killed job resumes where it stopped.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, help="the raw BIDS dataset")
    p.add_argument("output_dir", type=Path, help="the derivative dataset to write")
    p.add_argument("analysis_level", choices=["participant"], help="only 'participant'")
    p.add_argument(
        "--participant-label", nargs="+", metavar="LABEL", help="subjects to deface (default: all)"
    )
    p.add_argument(
        "--in-place",
        action="store_true",
        help="write the defaced images over the raw ones; the raw ones are kept in "
        "OUTPUT_DIR/sourcedata with a manifest of checksums (a rerun defaces only new data)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite existing outputs, and deface images that are defaced already",
    )
    add_max_gb_option(p, "refuse an image whose run would need more memory, from its header")
    run = p.add_argument_group("execution")
    run.add_argument("--plugin", choices=PLUGINS, default="MultiProc", help="Nipype plugin")
    run.add_argument(
        "--plugin-args", default="{}", metavar="JSON", help="Nipype plugin_args as JSON"
    )
    run.add_argument(
        "--nprocs",
        type=number(int, 1),
        default=os.cpu_count() or 1,
        help="processes for MultiProc (default: all cores)",
    )
    run.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        default=Path("work"),
        help="Nipype's working folder, kept for resuming (default ./work; on a cluster it must "
        "be on a shared file system)",
    )
    p.add_argument(
        "--bids-filter-file",
        type=Path,
        metavar="FILE",
        help='JSON queries selecting the images, as fMRIPrep\'s: {"t1w": {"session": '
        '"pre"}, "t2w": {"acquisition": null}}; a query is named after a lower-case '
        'suffix, values are labels, lists, null (absent) or "*" (present); "t1w" may name '
        'the reference\'s suffix ("suffix": "UNIT1")',
    )
    p.add_argument(
        "--regheader",
        action="store_true",
        help="the images of a session share the T1w's scanner space: no registration",
    )
    p.add_argument(
        "--atlas",
        type=Path,
        metavar="DIR",
        help="another atlas folder (as the package's atlas/: head, surface, priors)",
    )
    protection, source = add_engine_options(
        p,
        pics_help="pictures of each face before and after defacing, outlined slices and the "
        "dist-to-face check, in each session's report and sub-<label>.html",
    )
    source.add_argument(
        "--xmask",
        type=Path,
        metavar="DIR",
        help="each session's own exclusion mask, from DIR laid out as OUTPUT_DIR: "
        "DIR/sub-01/anat/sub-01_desc-exclusion_mask.nii.gz on the T1w's grid (an earlier "
        "run's, edited); voxels > 0.5 are never modified",
    )
    protection.add_argument(
        "--init-reg",
        type=Path,
        metavar="DIR",
        help="start each session's registration from DIR/sub-01/anat/"
        "sub-01_from-T1w_to-mideface_mode-image_xfm.txt (4x4 RAS, T1w mm -> atlas mm; an "
        "earlier run's)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="Nipype's own messages too")
    p.add_argument("--version", action="version", version=f"mideface-nipype {__version__}")
    return p


def bids_engine_options(args) -> dict:
    """``init_bids_wf`` keywords from the command line (``mideface``'s rules, and ``--atlas``)."""
    from mideface_nipype.utils import io

    options = engine_options(args) | {"regheader": args.regheader}
    if args.atlas:
        if not args.atlas.is_dir():
            raise io.InputError(f"{args.atlas}: atlas folder not found")
        options["atlas_dir"] = str(args.atlas.resolve())
    return options


def session_inputs(args, sessions) -> dict[str, dict]:
    """Each session's own files (``--xmask``, ``--init-reg``) as ``init_bids_wf`` keywords;
    ``InputError`` naming the first that is missing or unreadable."""
    from mideface_nipype.utils import bids

    found = {}
    if args.xmask:
        found["xmasks"] = bids.session_xmasks(sessions, args.xmask)
    if args.init_reg:
        found["init_transforms"] = bids.session_transforms(sessions, args.init_reg)
    return found


def build_workflow(args, sessions, bids_dir: Path, output_dir: Path, inputs: dict | None = None):
    """The dataset's graph for the command line ``args`` (``inputs``: ``session_inputs``)."""
    from mideface_nipype.workflows.bids import init_bids_wf

    return init_bids_wf(
        sessions,
        bids_dir=bids_dir,
        output_dir=output_dir,
        in_place=args.in_place,
        **(session_inputs(args, sessions) if inputs is None else inputs),
        **bids_engine_options(args),
    )


def plugin_settings(plugin: str, plugin_args_json: str, nprocs: int) -> tuple[dict, str | None]:
    """(plugin_args, the SLURM comment that tags this run's SLURMGraph jobs, else None)."""
    from mideface_nipype.utils.io import InputError

    try:
        plugin_args = json.loads(plugin_args_json)
    except ValueError as err:
        raise InputError(f"--plugin-args: not valid JSON ({err})") from err
    if not isinstance(plugin_args, dict):
        raise InputError("--plugin-args: must be a JSON object")
    tag = None
    if plugin == "MultiProc":
        plugin_args.setdefault("n_procs", nprocs)
    if plugin in ("Linear", "MultiProc"):
        from nipype import config

        config.set("execution", "poll_sleep_duration", str(LOCAL_POLL_S))
    if plugin in ("SLURM", "SLURMGraph"):
        if shutil.which("sbatch") is None:
            raise InputError(f"--plugin {plugin}: sbatch not found (is SLURM installed?)")
        # nipype's SLURM plugin names jobs after $LOGNAME (KeyError when it is unset)
        os.environ.setdefault("LOGNAME", getpass.getuser())
    if plugin == "SLURMGraph":
        tag = f"mideface-{uuid.uuid4().hex[:12]}"
        plugin_args["sbatch_args"] = (
            f"{plugin_args.get('sbatch_args', '')} --comment={tag} --kill-on-invalid-dep=yes"
        ).strip()
        plugin_args.setdefault("dont_resubmit_completed_jobs", True)
    return plugin_args, tag


def wait_for_slurm_jobs(tag: str, poll_s: float = SLURM_POLL_S) -> None:
    """SLURMGraph's run() returns once the jobs are submitted: wait until none of ours is left."""
    while True:
        queue = subprocess.run(
            ["squeue", "-h", "-o", "%k"], capture_output=True, text=True, check=True
        ).stdout
        if tag not in queue.split():
            return
        time.sleep(poll_s)


def _crash_reasons(crash_dir: Path, since: float) -> dict[str, str]:
    """{node hierarchy: one-line reason} from Nipype's text crash files written since ``since``
    (a write refused in the work folder, ``crash_dir``'s parent, is said so: the last line of
    such a crash names a missing result file)."""
    from mideface_nipype.utils import io

    reasons = {}
    for crash in crash_dir.glob("crash-*.txt"):
        if crash.stat().st_mtime < since:
            continue
        error = RuntimeError(crash.read_text(errors="replace"))
        lines = [ln for ln in str(error).splitlines() if ln.startswith("Node:")]
        node = lines[0].split(":", 1)[1].strip() if lines else ""
        full = io.work_folder_error(error, crash_dir.parent)
        reasons[node] = str(full) if full is not None else error_line(error)
    return reasons


def array_participants(bids_dir: Path, bids_filter_file: Path | None = None) -> list[str]:
    """The participants with a T1w to deface, sorted: what SLURM array task indices count."""
    from mideface_nipype.utils import bids

    filters = bids.load_filters(bids_filter_file) if bids_filter_file else None
    return sorted({session.subject for session in bids.discover(bids_dir, None, filters)})


def slurm_array_task(args, bids_dir: Path, output_dir: Path) -> tuple[list[str] | None, dict]:
    """(participant labels, {folder to lock: what}) of this run.

    In a SLURM array task (``SLURM_ARRAY_TASK_ID`` set) without ``--participant-label``, task i
    defaces the i-th of ``array_participants``. The tasks of an array write one derivative
    dataset side by side, so each locks only its participants' folders, not the whole output.
    """
    from mideface_nipype.utils import io

    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        return args.participant_label, {output_dir: "output folder"}
    labels = args.participant_label
    if not labels:
        participants = array_participants(bids_dir, args.bids_filter_file)
        if not task.isdigit() or int(task) >= len(participants):
            raise io.InputError(
                f"{bids_dir}: SLURM_ARRAY_TASK_ID={task} but the dataset has "
                f"{len(participants)} participant(s) to deface: submit --array=0-"
                f"{len(participants) - 1}"
            )
        labels = [participants[int(task)]]
    names = [f"sub-{label.removeprefix('sub-')}" for label in labels]
    return labels, {output_dir / name: "participant output folder" for name in names}


def run(args) -> int:
    from mideface_nipype.utils import io

    bids_dir, output_dir = args.bids_dir.resolve(), args.output_dir.resolve()
    work_dir = args.work_dir.resolve()
    if output_dir == bids_dir:
        raise io.InputError(f"{args.output_dir}: the output folder would overwrite the dataset")
    check_work_folder(args.work_dir, {bids_dir: "the dataset", output_dir: "the output folder"})
    plugin_args, tag = plugin_settings(args.plugin, args.plugin_args, args.nprocs)
    args.participant_label, output_locks = slurm_array_task(args, bids_dir, output_dir)
    # one run at a time per work folder, output folder and (in place) dataset: a second run
    # stops at once with a clear message instead of both failing half-way
    folders = {work_dir: "work folder", **output_locks}
    if args.in_place:
        folders[bids_dir] = "dataset"
    with contextlib.ExitStack() as locks:
        for folder, what in folders.items():
            locks.enter_context(io.locked(folder, what))
        return _run_locked(args, bids_dir, output_dir, work_dir, plugin_args, tag)


def _run_locked(args, bids_dir, output_dir, work_dir, plugin_args, tag) -> int:
    from mideface_nipype.utils import bids, io
    from mideface_nipype.workflows.multiproc import MultiProcPlugin

    setup_logging("mideface-bids", args.verbose)
    # one subject's failure must not stop the others
    configure_nipype(stop_on_first_crash=False, crashdump_dir=work_dir / "crash")
    filters = bids.load_filters(args.bids_filter_file) if args.bids_filter_file else None
    sessions = bids.discover(bids_dir, args.participant_label, filters)
    subjects = sorted({session.subject for session in sessions})
    # every check before any work or write: inputs, the output folder's owner, existing outputs
    bids.validate(sessions, bids_dir, max_gb=args.max_gb)
    bids.check_output_folder(bids_dir, output_dir)
    bids_engine_options(args)  # refuses bad options now
    inputs = session_inputs(args, sessions)
    if args.in_place:
        sessions = bids.prepare_in_place(sessions, bids_dir, output_dir, force=args.force)
    else:
        sessions = bids.plan_derivatives(sessions, bids_dir, output_dir, force=args.force)
    LOGGER.info(
        "mideface-nipype %s: %d session(s) of %s -> %s (%s)",
        __version__,
        len(sessions),
        bids_dir,
        output_dir,
        args.plugin,
    )
    bids.write_dataset_description(bids_dir, output_dir)
    if not sessions:
        LOGGER.info("nothing to deface")
        write_subject_reports(output_dir, subjects)  # a run killed before them
        return 0
    workflow = build_workflow(args, sessions, bids_dir, output_dir, inputs)
    workflow.base_dir = str(work_dir)
    start, started_at = time.perf_counter(), time.time()
    try:
        if args.plugin == "MultiProc":  # one that ends when a node's work folder is full
            workflow.run(plugin=MultiProcPlugin(plugin_args=plugin_args))
        else:
            workflow.run(plugin=args.plugin, plugin_args=plugin_args)
    except RuntimeError as err:  # Nipype: "Workflow did not execute cleanly"
        LOGGER.debug("workflow failed: %s", err)
    except OSError as err:  # the graph's own files (before any node)
        if (named := io.work_folder_error(err, work_dir)) is None:
            raise
        raise named from err
    if tag:
        wait_for_slurm_jobs(tag)
    reasons = _crash_reasons(work_dir / "crash", started_at)
    failed = []
    for session in sessions:
        missing = [
            p
            for p in bids.expected_outputs(session, bids_dir, output_dir, in_place=args.in_place)
            if not p.exists() or p.stat().st_mtime < started_at  # not (re)written by this run
        ]
        if missing:
            why = next((r for n, r in reasons.items() if f".{session.name}." in f".{n}."), None)
            failed.append(f"{session.label}: {why or f'{missing[0]} not written'}")
    write_subject_reports(output_dir, subjects)
    elapsed = time.perf_counter() - start
    LOGGER.info(
        "%d of %d session(s) done in %.1f s", len(sessions) - len(failed), len(sessions), elapsed
    )
    for line in failed:
        print(f"mideface-bids: error: {line}", file=sys.stderr)
    return 1 if failed else 0


def write_subject_reports(output_dir: Path, subjects: list[str]) -> None:
    """``sub-<label>.html`` of each subject, from what its sessions published (this run's or
    an earlier one's)."""
    from mideface_nipype.utils import bids

    for subject in subjects:
        bids.write_subject_report(output_dir, subject)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("mideface-bids: interrupted; rerun to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one clear line for any failure
        print(f"mideface-bids: error: {error_line(err)}", file=sys.stderr)
        return 1
    finally:
        close_logging()


if __name__ == "__main__":
    sys.exit(main())
