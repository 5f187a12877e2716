"""The test session's cache (``runcache``): one build per entry across processes, keys that follow
every input and the code, nothing left by a failed build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import runcache
from conftest import unshared_subprocesses

#: A process that asks for entry t/k, whose build takes a second and counts itself.
ASK = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import runcache
runcache.configure(Path(sys.argv[2]))
def build(folder):
    with open(sys.argv[3], "a") as counter:
        counter.write("built ")
    time.sleep(1.0)
    (folder / "value").write_text("42")
print(runcache.cached_dir("t", "k", build))
"""


@pytest.fixture
def own_root(tmp_path, monkeypatch):
    saved = list(runcache._root)
    # the session's (set for the processes tests start) would win over this folder
    monkeypatch.delenv(runcache.CACHE_ENV, raising=False)
    runcache.configure(tmp_path / "cache")
    yield tmp_path / "cache"
    runcache._root[:] = saved


def test_an_entry_is_built_once_for_processes_asking_together(own_root, tmp_path):
    counter = tmp_path / "builds.txt"
    args = [sys.executable, "-c", ASK, str(Path(__file__).parent), str(own_root), str(counter)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    paths = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    assert counter.read_text() == "built "
    (entry,) = paths
    assert (Path(entry) / "value").read_text() == "42"
    assert not (Path(entry) / "value").stat().st_mode & 0o222  # read-only


def test_a_failed_build_leaves_nothing_and_the_next_caller_builds(own_root):
    def fails(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        runcache.cached_dir("t", "k", fails)
    assert not (own_root / "t" / "k").exists()
    entry = runcache.cached_dir("t", "k", lambda folder: (folder / "v").write_text("1"))
    assert [p.name for p in entry.iterdir()] == ["v"]


def test_keys_follow_values_files_and_the_code(tmp_path, monkeypatch):
    a = tmp_path / "a.txt"
    a.write_text("one")
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    base = runcache.key("x", arr, a, {"seed": 7})
    assert base == runcache.key("x", arr.copy(), a, {"seed": 7})
    assert base != runcache.key("x", arr.T, a, {"seed": 7})  # shape counts
    assert base != runcache.key("x", arr.astype(np.float64), a, {"seed": 7})  # dtype counts
    assert base != runcache.key("x", arr, a, {"seed": 8})
    a.write_text("two")
    os.utime(a, ns=(1, 1))  # a new mtime: the file is read again
    assert base != runcache.key("x", arr, a, {"seed": 7})
    monkeypatch.setattr(runcache, "code_version", lambda: "another version")
    a.write_text("one")
    os.utime(a, ns=(2, 2))
    assert base != runcache.key("x", arr, a, {"seed": 7})


def test_memoized_calls_once_and_fresh_registrations_restore_the_real_steps(own_root):
    calls = []

    def double(values: np.ndarray, *, factor: int = 2) -> np.ndarray:
        calls.append(1)
        return values * factor

    shared = runcache.memoized("double", double)
    assert np.array_equal(shared(np.ones(3)), [2, 2, 2])
    assert np.array_equal(shared(np.ones(3)), [2, 2, 2]) and len(calls) == 1
    assert np.array_equal(shared(np.ones(3), factor=3), [3, 3, 3]) and len(calls) == 2
    # a setting the function reads (as register's ANTS_SEED) is part of the key
    setting = {"seed": 1}
    seeded = runcache.memoized("seeded", double, lambda: setting)
    for seed in (1, 1, 2):
        setting["seed"] = seed
        seeded(np.ones(3))
    assert len(calls) == 4

    from mideface_nipype.engine import register

    shared_steps = [getattr(register, name) for name in runcache.REGISTRATION_STEPS]
    with runcache.fresh_registrations():
        for name, step in zip(runcache.REGISTRATION_STEPS, shared_steps, strict=True):
            assert getattr(register, name) is getattr(step, "__wrapped__", step)
    assert [getattr(register, name) for name in runcache.REGISTRATION_STEPS] == shared_steps


#: A process that says whether its register module's steps are the session's.
SHARED = (
    "from mideface_nipype.engine import register; "
    f"print(all(hasattr(getattr(register, name), '__wrapped__') for name in "
    f"{runcache.REGISTRATION_STEPS!r}))"
)


def test_processes_a_test_starts_share_the_registrations():
    """A process started by a test (a CLI run, a SLURM job) shares them; one started under
    ``unshared_subprocesses`` (a test that counts CPU seconds) does not."""

    def shared() -> str:
        proc = subprocess.run([sys.executable, "-c", SHARED], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert shared() == "True"
    with unshared_subprocesses():
        assert shared() == "False"
