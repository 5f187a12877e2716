"""Shared fixtures: the real heads that live in ``../shared/data/heads`` beside the checkout."""

from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
HEADS_DIR = SHARED_DIR / "data" / "heads"
ATLAS_SOURCES_DIR = SHARED_DIR / "data" / "atlas-sources"

#: Heads with the whole face in view (T1w); colin27 has nose and mouth cut by the box.
FACE_HEADS = sorted(p.name for p in HEADS_DIR.glob("IXI*_ds.nii.gz")) + [
    "dcmqa-xa30_T1w_2mm.nii.gz",
]
ALL_T1W_HEADS = FACE_HEADS + ["colin27_ch2_T1w.nii.gz", "chris_T1w.nii.gz"]


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
