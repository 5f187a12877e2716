"""The errors a user can meet: one hierarchy, each error one line naming the file and the problem.

A ``MidefaceError`` is what a command prints after ``error:``; anything else is a bug or a
failure of the system (disk full, killed process). A step that fails inside a Nipype node loses
its exception object: Nipype keeps only the traceback text (in the crash file, and in the
error the plugin raises, from another process with MultiProc or SLURM). So every
``MidefaceError`` carries a note, which Python prints in every traceback, holding its path and
problem as JSON after ``CRASH_MARK``; ``carried_error`` rebuilds the error from such a text.
"""

from __future__ import annotations

import json
import os

#: Start of the traceback note line that carries a ``MidefaceError`` out of a Nipype node.
CRASH_MARK = "mideface-error: "


class MidefaceError(Exception):
    """A problem the user can fix: ``str()`` is ``"PATH: problem"`` (``"problem"`` with no file).

    ``path`` is the file that failed (None when the problem is not one file's), ``problem`` the
    rest of the line.
    """

    def __init__(self, problem: str = "", path: str | os.PathLike | None = None):
        self.problem = str(problem)
        self.path = None if path is None else str(path)
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")
        self.add_note(CRASH_MARK + json.dumps({"path": self.path, "problem": self.problem}))

    def __reduce__(self):
        return type(self), (self.problem, self.path)


class InputError(MidefaceError, ValueError):
    """An input file (or option) that cannot be defaced or used."""


class OutputError(InputError):
    """An output that must not or cannot be written."""


class NoHeadError(MidefaceError, ValueError):
    """No plausible head could be segmented (empty, constant, or noise-only image)."""


class RegistrationError(MidefaceError, RuntimeError):
    """The atlas did not land on the head; defacing would cut the wrong place."""


def carried_error(err: BaseException) -> MidefaceError | None:
    """``err`` if it is a ``MidefaceError``, else the last one noted in its text or in the text
    of its cause (a Nipype node's crash, re-raised by the plugin), as a plain ``MidefaceError``;
    None for any other error."""
    while err is not None:
        if isinstance(err, MidefaceError):
            return err
        found = error_from_text(str(err))
        if found is not None:
            return found
        err = err.__cause__
    return None


def error_from_text(text: str) -> MidefaceError | None:
    """The last ``MidefaceError`` noted in a traceback text (Nipype crash file), else None."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith(CRASH_MARK):
            try:
                fields = json.loads(line.removeprefix(CRASH_MARK))
                return MidefaceError(fields["problem"], fields["path"])
            except (ValueError, KeyError, TypeError):
                continue
    return None
