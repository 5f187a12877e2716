"""What the ``mideface`` and ``mideface-bids`` commands share: the parser, the engine options,
the logging and the one line a failure prints."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from mideface_nipype.utils.errors import InputError, carried_error

if TYPE_CHECKING:  # the CLI imports the package's heavier modules only when it runs
    from mideface_nipype.utils.io import Publisher

#: The package's logger: every module logs under it (``logging.getLogger(__name__)``).
PACKAGE_LOGGER = logging.getLogger("mideface_nipype")
#: Nipype's loggers, quiet unless ``--verbose`` (their tracebacks of a failed node included).
NIPYPE_LOGGERS = ("nipype.workflow", "nipype.interface", "nipype.utils")
#: How a log line (and the warning of a log that lost lines) gives the time.
LOG_TIME_FORMAT = "%H:%M:%S"


class LogFile(logging.FileHandler):
    """The run's log file. A write the file system refuses (full, read-only) is kept as
    ``problem`` instead of a "--- Logging error ---" traceback on stderr per line; at the start
    of a run ``check_log`` then stops it with one line, later ``close_logging`` warns."""

    def __init__(self, path: Path, prog: str):
        from mideface_nipype.utils import io

        self.created = io.missing_folders(path.parent)
        self.existed = path.exists()  # a log appended to (or /dev/full) is never removed
        self.prog = prog
        self.problem: OSError | None = None
        #: when the first line that could not be written was logged (None: at closing)
        self.lost_from: float | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            super().__init__(path)
        except OSError as err:
            io.remove_empty(self.created)
            raise io.cannot_write(path, err) from err

    def emit(self, record: logging.LogRecord) -> None:
        if self.problem is None:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        self.problem, self.lost_from = error, record.created

    def close(self) -> None:
        try:
            super().close()
        except OSError as err:  # the last flush
            self.problem = self.problem or err

    def incomplete(self) -> str | None:
        """The warning line of a log that lost lines, None when it is whole."""
        if self.problem is None:
            return None
        if self.lost_from is None:  # the last flush, at closing
            lost = "at its end"
        else:
            lost = f"from {time.strftime(LOG_TIME_FORMAT, time.localtime(self.lost_from))} on"
        why = self.problem.strerror or str(self.problem)
        return f"{self.prog}: warning: {self.baseFilename}: lines {lost} were not written ({why})"

    def discard(self) -> None:
        """Close, and remove the log and the folders made for it (unless it was there)."""
        from mideface_nipype.utils import io

        self.close()
        if not self.existed:
            Path(self.baseFilename).unlink(missing_ok=True)
            io.remove_empty(self.created)


def check_work_folder(work_dir: Path, folders: dict[Path, str]) -> None:
    """``InputError`` naming ``work_dir`` if it is, or is inside, one of ``folders`` (a
    dataset, an output folder; the value says which): Nipype's folders would land in it."""
    from mideface_nipype.utils import io

    work = work_dir.resolve()
    for folder, what in folders.items():
        if (root := folder.resolve()) == work or root in work.parents:
            raise io.InputError(
                f"the work folder is inside {what} {folder}; give --work-dir outside it",
                path=work_dir,
            )


def warn_mgh_rounding(outputs: Iterable[tuple[Path, str | Path]]) -> None:
    """A warning for each (input volume, output) pair whose ``.mgz``/``.mgh`` output cannot hold
    the input's values exactly (``io.mgh_rounding``): its untouched voxels, the brain's
    included, would differ from the input's."""
    from mideface_nipype.utils import io

    for source, out in outputs:
        if io.split_suffix(out)[1] not in io.MGH_SUFFIXES:
            continue
        n_voxels, from_dtype, to_dtype = io.mgh_rounding(io.load_volume(source))
        if n_voxels:
            PACKAGE_LOGGER.warning(
                "warning: %s: MGH stores no %s, so %d voxels of %s (untouched ones too) are "
                "written as %s and change; name it .nii.gz to keep them bit for bit",
                out,
                from_dtype,
                n_voxels,
                source,
                to_dtype,
            )


#: Bytes read from an existing log file to tell text (a log to append to) from data.
TEXT_PROBE_BYTES = 8192


def check_log_file(log_file: Path, publisher: Publisher, outputs: Iterable[str | Path]) -> Path:
    """``log_file`` unless appending to it could damage data: a volume name, a file the run
    reads (``publisher``'s) or writes (``outputs``), by path or inode, or an existing file that
    is not text (a DICOM has no suffix); ``OutputError`` naming it."""
    from mideface_nipype.utils import io

    if io.split_suffix(log_file)[1]:
        raise io.OutputError(
            "--log writes text, not a volume; refusing this volume name", path=log_file
        )
    publisher.refuse_reads(log_file)
    if any(io.same_file(log_file, out) for out in outputs):
        raise io.OutputError("two outputs of this run have this name", path=log_file)
    if log_file.is_file() and not _is_text(log_file):
        raise io.OutputError("is not a text file; refusing to append the log to it", path=log_file)
    return log_file


def _is_text(path: Path) -> bool:
    """No NUL byte and valid UTF-8 (but for a sequence cut at the end) in the file's start."""
    with open(path, "rb") as handle:
        head = handle.read(TEXT_PROBE_BYTES)
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start >= len(head) - 3 and err.reason == "unexpected end of data"
    return True


def check_log() -> None:
    """``OutputError`` naming the log file if a line could not be written to it (disk full),
    the log discarded first: while the run still holds its output lock, whose folders are then
    left empty for the lock to remove."""
    for handler in PACKAGE_LOGGER.handlers:
        if isinstance(handler, LogFile) and handler.problem is not None:
            from mideface_nipype.utils import io

            PACKAGE_LOGGER.removeHandler(handler)
            handler.discard()
            raise io.cannot_write(handler.baseFilename, handler.problem)


class Parser(argparse.ArgumentParser):
    """argparse with exit code 1 for a bad command line, like every other refusal."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def number(kind: type, low: float, *, inclusive: bool = True):
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


def add_max_gb_option(group, refuses: str) -> None:
    """``--max-gb``: the memory bound checked from each header before any work; ``refuses``
    says what is refused, the default is appended."""
    from mideface_nipype.utils.io import DEFAULT_MAX_GB

    group.add_argument(
        "--max-gb",
        type=number(float, 0, inclusive=False),
        default=DEFAULT_MAX_GB,
        metavar="GB",
        help=f"{refuses} (default {DEFAULT_MAX_GB:g})",
    )


def add_engine_options(parser: argparse.ArgumentParser, *, pics_help: str):
    """The defacing options both commands pass to the engine, in the groups "what to deface",
    "how to fill", "protection" and "quality control"; ``pics_help`` says where ``--pics`` puts
    the pictures. Returns (the protection group, its exclusive choice of the exclusion mask's
    source), where a command adds its own ``--xmask`` and ``--init-reg``."""
    from mideface_nipype.engine import bracket, exclusion, fill

    what = parser.add_argument_group("what to deface")
    what.add_argument(
        "--ears", dest="ears", action="store_true", default=True, help="deface the ears (default)"
    )
    what.add_argument("--no-ears", dest="ears", action="store_false", help="leave the ears")
    what.add_argument(
        "--forehead", action="store_true", help="deface the forehead too (risks brain)"
    )
    what.add_argument("--no-forehead", dest="forehead", action="store_false")
    what.add_argument("--back-of-head", action="store_true", help="deface the back of the head")
    what.add_argument("--no-back-of-head", dest="back_of_head", action="store_false")

    how = parser.add_argument_group("how to fill")
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
        type=number(float, 0, inclusive=False),
        metavar="AMP PERIOD",
        help=f"ripple the template surface (default amplitude {bracket.RIPPLE_AMP_MM} mm, "
        f"period {bracket.RIPPLE_PERIOD_MM} mm)",
    )
    how.add_argument(
        "--statframe",
        type=number(int, 0),
        default=fill.STAT_FRAME,
        help=f"frame of a 4-D image used for the fill statistics (default {fill.STAT_FRAME})",
    )
    how.add_argument(
        "--seed",
        type=number(int, 0),
        default=fill.DEFAULT_SEED,
        help=f"random seed of the noise fill (default {fill.DEFAULT_SEED}); same data and seed, "
        "same bytes",
    )

    protection = parser.add_argument_group("protection")
    source = protection.add_mutually_exclusive_group()
    samseg_default = exclusion.DEFAULT_XMASK_SOURCE == "segment"
    source.add_argument(
        "--samseg",
        dest="samseg",
        action="store_true",
        default=samseg_default,
        help="exclusion mask from the SAMSEG-style segmentation of this head: brain, skull, "
        "eyes" + (" (default)" if samseg_default else ""),
    )
    source.add_argument(
        "--no-samseg",
        dest="samseg",
        action="store_false",
        help="exclusion mask from the atlas brain and eyes only, through the registration "
        "(faster)" + ("" if samseg_default else " (default)"),
    )

    qa = parser.add_argument_group("quality control")
    qa.add_argument("--pics", action="store_true", help=pics_help)
    return protection, source


def engine_options(args: argparse.Namespace) -> dict:
    """The engine's keywords (``init_mideface_wf``'s) from the options of
    ``add_engine_options`` and the command's ``--xmask``; ``InputError`` for a bad ``--ripple``."""
    if args.ripple is not None and len(args.ripple) > 2:
        raise InputError(f"--ripple takes AMP and PERIOD at most, not {len(args.ripple)}")
    fill_const = (0.0, 0.0) if args.fill_zero else args.fill_const
    options = {
        "xmask_source": "user" if args.xmask else ("segment" if args.samseg else "atlas"),
        "ears": args.ears,
        "forehead": args.forehead,
        "back_of_head": args.back_of_head,
        "ripple": args.ripple is not None,
        "seed": args.seed,
        "fill_const": tuple(fill_const) if fill_const else None,
        "stat_frame": args.statframe,
        "pics": args.pics,
    }
    if args.ripple:
        options |= dict(zip(("ripple_amp_mm", "ripple_period_mm"), args.ripple, strict=False))
    return options


def setup_logging(prog: str, verbose: bool, log_file: Path | None = None) -> None:
    """Every module's lines (the ``mideface_nipype`` loggers) to stderr, and to ``log_file``,
    as ``HH:MM:SS PROG: message``; Nipype's own only with ``verbose`` (without it, a failure is
    one line naming the file and the problem)."""
    from nipype import logging as nlogging

    close_logging()
    PACKAGE_LOGGER.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s {prog}: %(message)s", LOG_TIME_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(LogFile(log_file, prog))
    for handler in handlers:
        handler.setFormatter(fmt)
        PACKAGE_LOGGER.addHandler(handler)
    for name in NIPYPE_LOGGERS:
        nlogging.getLogger(name).setLevel(logging.INFO if verbose else logging.CRITICAL)


def configure_nipype(*, stop_on_first_crash: bool, crashdump_dir: Path | None = None) -> None:
    """Nipype's execution settings of a command: text crash files (``error_line`` reads the
    error of a failed node from them), every output kept for publishing."""
    from nipype import config

    config.set("execution", "crashfile_format", "txt")
    config.set("execution", "stop_on_first_crash", str(stop_on_first_crash).lower())
    config.set("execution", "remove_unnecessary_outputs", "false")
    if crashdump_dir is not None:
        config.set("execution", "crashdump_dir", str(crashdump_dir))


def close_logging() -> None:
    """Close the handlers; a log file that lost lines during the run says so on stderr (the
    outputs can still be whole: the log may be on another disk)."""
    for handler in PACKAGE_LOGGER.handlers:
        handler.close()
        if isinstance(handler, LogFile) and (warning := handler.incomplete()):
            print(warning, file=sys.stderr)
    PACKAGE_LOGGER.handlers.clear()


def log_error(message: str) -> None:
    """The error line also in the log file (the console gets it from the command)."""
    record = PACKAGE_LOGGER.makeRecord(
        PACKAGE_LOGGER.name, logging.ERROR, __file__, 0, "error: %s", (message,), None
    )
    for handler in PACKAGE_LOGGER.handlers:
        if isinstance(handler, LogFile):
            handler.handle(record)


def error_line(err: BaseException) -> str:
    """What a command prints for ``err``, as one line: a ``MidefaceError``'s text (also from a
    failed Nipype node, see ``utils.errors``), else the last line of ``err``'s text (the last
    line of a traceback is its error)."""
    found = carried_error(err)
    if found is not None:
        return " ".join(str(found).split())
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
