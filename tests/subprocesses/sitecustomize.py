"""In a Python process started by a test (a CLI run, a SLURM job, a MultiProc worker): the
session's registrations (``runcache.shared_registrations``) are shared here too.

``conftest.py`` puts this folder on ``PYTHONPATH`` and names the session's cache in
``runcache.CACHE_ENV``; without that variable nothing is shared. The engine's register module is
patched when it is first imported (a process that never registers imports nothing more).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

#: The module whose steps are shared, and the test helper that shares them.
_REGISTER = "mideface_nipype.engine.register"
_RUNCACHE = Path(__file__).resolve().parents[1] / "runcache.py"
#: The sharing context, held open until the process ends.
_SHARING: list = []


class _ShareOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``_REGISTER`` is imported, wraps its loading so that the
    session's registrations replace its steps once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != _REGISTER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module) -> None:
            load(module)
            runcache = _load_runcache()
            if os.environ.get(runcache.CACHE_ENV):
                runcache.configure(Path(os.environ[runcache.CACHE_ENV]))
                # for the life of the process, as the session's fixture does for its workers
                # (kept: a collected context manager would restore the steps)
                _SHARING.append(runcache.shared_registrations())
                _SHARING[-1].__enter__()

        spec.loader.exec_module = exec_module
        return spec


def _load_runcache():
    if "runcache" not in sys.modules:
        spec = importlib.util.spec_from_file_location("runcache", _RUNCACHE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["runcache"] = module
        spec.loader.exec_module(module)
    return sys.modules["runcache"]


sys.meta_path.insert(0, _ShareOnImport())
