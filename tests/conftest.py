"""Shared fixtures: the real heads that live in ``../shared/data/heads`` beside the checkout,
and the session's cache of expensive results (``runcache``)."""

import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import runcache

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
HEADS_DIR = SHARED_DIR / "data" / "heads"
ATLAS_SOURCES_DIR = SHARED_DIR / "data" / "atlas-sources"
#: The folder whose sitecustomize shares the session's registrations with the processes tests start.
SHARING_PATH = str(Path(__file__).resolve().parent / "subprocesses")
#: How a test module reaches the real data in ``../shared``.
_USES_SHARED = re.compile(
    r"\b(HEADS_DIR|ATLAS_SOURCES_DIR|SHARED_DIR|heads_dir|default_run)\b"
    r"|^from (brain|bids_data) import",
    re.M,
)

#: Heads with the whole face in view (T1w); colin27 has nose and mouth cut by the box.
FACE_HEADS = [
    "IXI012-HH-1211-T1_ds.nii.gz",
    "IXI013-HH-1212-T1_ds.nii.gz",
    "IXI014-HH-1236-T1_ds.nii.gz",
    "IXI015-HH-1258-T1_ds.nii.gz",
    "IXI033-HH-1259-T1_ds.nii.gz",
    "IXI034-HH-1260-T1_ds.nii.gz",
    "dcmqa-xa30_T1w_2mm.nii.gz",
]
ALL_T1W_HEADS = FACE_HEADS + ["colin27_ch2_T1w.nii.gz", "chris_T1w.nii.gz"]


#: The test files that take minutes, longest first (one run of the README's command with other
#: jobs on the 2 cores: 895, 461, 430, 259 s, test_slurm about 250 s in CI, then 140-98 s). They
#: start first, before the many short files: with ``--dist loadfile`` a worker runs a whole
#: file, and a long file taken last keeps one worker busy while the other has nothing left.
LONGEST_FILES = (
    "test_contrasts.py",
    "test_robustness.py",
    "test_evaluate.py",
    "test_apply.py",
    "test_slurm.py",
    "test_inplace.py",
    "test_engine.py",
    "test_bids.py",
    "test_segment.py",
    "test_report.py",
    "test_audit.py",
)


def pytest_configure(config):
    """xdist's own order (files with more tests first) would undo ``LONGEST_FILES``'s."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _file_rank(item) -> int:
    name = Path(str(item.fspath)).name
    return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)


def pytest_collection_modifyitems(config, items):
    """The ``LONGEST_FILES`` first (each file's tests keep their order); without ``../shared`` (a
    clone on its own) the real-head tests skip, saying why once."""
    items.sort(key=_file_rank)
    if HEADS_DIR.is_dir() and ATLAS_SOURCES_DIR.is_dir():
        return
    skip = pytest.mark.skip(
        reason=f"real heads not found: {SHARED_DIR} (the project's shared data) is not beside "
        "the checkout"
    )
    needs = {}
    for item in items:
        path = Path(str(item.fspath))
        if path not in needs:
            needs[path] = bool(_USES_SHARED.search(path.read_text()))
        if needs[path]:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def heads_dir() -> Path:
    assert HEADS_DIR.is_dir(), f"real heads not found at {HEADS_DIR}"
    return HEADS_DIR


@pytest.fixture(scope="session", autouse=True)
def nipype_crash_files(tmp_path_factory) -> Path:
    """Nipype's crash reports of tests that fail on purpose go to a temporary folder, not the
    checkout (the CLI points them at its work folder; workflows run directly would not)."""
    from nipype import config

    crash_dir = tmp_path_factory.mktemp("crash")
    config.set("execution", "crashdump_dir", str(crash_dir))
    return crash_dir


@pytest.fixture(scope="session", autouse=True)
def run_cache(tmp_path_factory) -> Path:
    """The session's cache folder, beside the xdist workers' temporary folders (so all of them
    share it); registrations are shared through it for the whole session."""
    base = tmp_path_factory.getbasetemp()
    session = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    runcache.configure(session / "runcache")
    with pytest.MonkeyPatch.context() as patch, runcache.shared_registrations():
        # and in every Python process a test starts (CLI runs, SLURM jobs): sitecustomize
        patch.setenv(runcache.CACHE_ENV, str(runcache.cache_root()))
        patch.setenv("PYTHONPATH", SHARING_PATH, prepend=os.pathsep)
        yield runcache.cache_root()


@contextmanager
def unshared_subprocesses():
    """Processes started while it holds run every registration (a test that counts their CPU)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(runcache.CACHE_ENV, raising=False)
        yield


@pytest.fixture
def fresh_registrations():
    """For a test of the registration's repeatability: every registration of the test runs."""
    with runcache.fresh_registrations():
        yield


def default_run(head: str, *options: str, **kwargs) -> Path:
    """``mideface --i HEADS_DIR/head --odir DIR *options`` made once per session: DIR, read-only
    (``runcache.default_run``; ``--pics`` is the runs of test_engine and test_report)."""
    return runcache.default_run(HEADS_DIR / head, *options, **kwargs)
