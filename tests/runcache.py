"""One test session's cache of expensive, deterministic results, shared by every test file and
every xdist worker.

An entry is a folder named by the sha256 of its inputs (file contents, arrays, options) and of
the code version (every file of the ``mideface_nipype`` package and of its atlas), so a change of
the code or the atlas never meets an old result. A file lock (``fcntl``) lets one process compute
an entry while the others wait for it; an entry appears (by rename) only once it is complete, and
its files are read-only: tests copy what they change.

The folder is the session's (beside the xdist workers' temporary folders, see ``configure``), or
``$PYTEST_RUN_CACHE`` when set.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import pickle
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

#: Environment variable naming a cache folder to use instead of the session's.
CACHE_ENV = "PYTEST_RUN_CACHE"
#: Functions of ``mideface_nipype.engine.register`` whose results a session shares: the pose
#: search and each ANTs optimisation, pure functions of their (small, registration-grid) arrays.
REGISTRATION_STEPS = ("search_initial_pose", "register_affine")

_root: list[Path] = []


def configure(session_dir: Path) -> None:
    """Use ``session_dir`` (shared by the session's xdist workers) unless ``$PYTEST_RUN_CACHE``."""
    _root[:] = [Path(os.environ.get(CACHE_ENV) or session_dir)]


def cache_root() -> Path:
    if not _root:
        raise RuntimeError("runcache.configure() was not called (tests/conftest.py does it)")
    return _root[0]


@functools.cache
def code_version() -> str:
    """sha256 of every file of the package and of the atlas it loads (any edit changes it)."""
    import mideface_nipype
    from mideface_nipype.engine.atlas import atlas_dir

    digest = hashlib.sha256()
    for folder in (Path(mideface_nipype.__file__).parent, atlas_dir()):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(folder)).encode() + b"\0")
                digest.update(_file_sha256(path).encode())
    return digest.hexdigest()


@functools.cache
def _file_sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    st = path.stat()
    return _file_sha256_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


def _feed(digest, obj) -> None:
    """Add ``obj`` to ``digest``, by value (arrays by bytes, files by name and contents)."""
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        digest.update(f"array {arr.dtype.str} {arr.shape}\0".encode())
        digest.update(arr.tobytes())
    elif isinstance(obj, nib.spatialimages.SpatialImage):
        digest.update(type(obj).__name__.encode())
        _feed(digest, (np.asanyarray(obj.dataobj), obj.affine))
    elif isinstance(obj, Path) and obj.is_dir():
        digest.update(f"folder {obj.name}(".encode())
        for path in sorted(p for p in obj.rglob("*") if p.is_file()):
            _feed(digest, path)
        digest.update(b")")
    elif isinstance(obj, Path):
        digest.update(f"file {obj.name} {_file_sha256(obj)}\0".encode())
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__} {len(obj)}(".encode())
        for item in obj:
            _feed(digest, item)
        digest.update(b")")
    elif isinstance(obj, dict):
        digest.update(f"dict {len(obj)}(".encode())
        for key in sorted(obj, key=repr):
            _feed(digest, key)
            _feed(digest, obj[key])
        digest.update(b")")
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic)):
        digest.update(f"{type(obj).__name__} {obj!r}\0".encode())
    elif callable(obj):
        digest.update(f"callable {obj.__module__}.{obj.__qualname__}\0".encode())
    else:
        raise TypeError(f"runcache cannot key a {type(obj).__name__}")


def key(*parts) -> str:
    """The entry name of ``parts`` under the current code version."""
    digest = hashlib.sha256(code_version().encode())
    _feed(digest, parts)
    return digest.hexdigest()[:32]


def _read_only(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def cached_dir(kind: str, name: str, build: Callable[[Path], None]) -> Path:
    """The folder of entry ``kind/name``, made by ``build(empty folder)`` in one process only.

    The folder is made where it stays (paths written into its files stay true) and counts once
    its ``.done`` marker exists; a failed ``build`` leaves nothing (the next caller tries again).
    """
    parent = cache_root() / kind
    final, done = parent / name, parent / f"{name}.done"
    if done.exists():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():  # made by another worker while this one waited
            return final
        shutil.rmtree(final, ignore_errors=True)  # left by a process that was killed
        final.mkdir()
        try:
            build(final)
            _read_only(final)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        done.touch()
    return final


def memoized(kind: str, func: Callable, settings: Callable[[], object] | None = None) -> Callable:
    """``func`` with its results shared by the session (pickled; keyed by every argument and by
    what ``settings()`` returns at the call: module constants the function reads)."""

    @functools.wraps(func)
    def shared(*args, **kwargs):
        def build(folder: Path) -> None:
            (folder / "result.pkl").write_bytes(pickle.dumps(func(*args, **kwargs)))

        try:
            name = key(kind, args, kwargs, settings() if settings else None)
        except TypeError:  # an argument without a value to key by: not shared
            return func(*args, **kwargs)
        entry = cached_dir(kind, name, build)
        return pickle.loads((entry / "result.pkl").read_bytes())

    return shared


@contextmanager
def shared_registrations() -> Iterator[None]:
    """While it holds, the pose search and ANTs optimisations of ``mideface_nipype.engine.register``
    (the engine's in-process nodes, ``evaluate.align_to_atlas``, the tests) are computed once per
    session for the same arrays, options and ``ANTS_*`` settings, in whatever test or worker
    first needs them."""
    from mideface_nipype.engine import register

    saved = {name: getattr(register, name) for name in REGISTRATION_STEPS}

    def settings() -> dict:  # ANTs' seed, sampling, bins and step, as the steps read them
        return {name: getattr(register, name) for name in dir(register) if name.startswith("ANTS_")}

    for name, func in saved.items():
        setattr(register, name, memoized(f"register.{name}", func, settings))
    try:
        yield
    finally:
        for name, func in saved.items():
            setattr(register, name, func)


@contextmanager
def fresh_registrations() -> Iterator[None]:
    """The real registration steps, for a test of their repeatability."""
    from mideface_nipype.engine import register

    shared = {name: getattr(register, name) for name in REGISTRATION_STEPS}
    for name, func in shared.items():
        setattr(register, name, getattr(func, "__wrapped__", func))
    try:
        yield
    finally:
        for name, func in shared.items():
            setattr(register, name, func)


def default_run(
    head: Path, *options: str, name: str | None = None, sidecar: str | None = None
) -> Path:
    """``mideface --i HEAD --odir DIR OPTIONS`` made once per session; DIR (read-only).

    ``name`` runs a copy of HEAD under that file name (with ``sidecar`` as its JSON sidecar), to
    be found at ``DIR.parent / "in" / name``. The defaced volume equals ``--o``'s: one engine,
    one publisher.
    """
    from mideface_nipype.cli import mideface as cli
    from mideface_nipype.reports import report
    from mideface_nipype.utils import bids

    name = name or head.name
    if sidecar is not None and not bids.is_bids_name(Path(name)):
        raise ValueError(f"{name}: a sidecar needs a BIDS name")

    def build(folder: Path) -> None:
        src = folder / "in" / name
        src.parent.mkdir()
        shutil.copyfile(head, src)
        if sidecar is not None:
            report.sidecar_path(src).write_text(sidecar)
        code = cli.main(["--i", str(src), "--odir", str(folder / "odir"), *options])
        assert code == 0, f"mideface --i {head} {' '.join(options)} failed"

    return cached_dir("run", key("run", head, name, sidecar, options), build) / "odir"
