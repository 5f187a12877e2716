"""A plain (non-editable) install carries the atlas and the sample head as package data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_non_editable_install_ships_atlas(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
    )
    code = (
        "import mideface_nipype, pathlib;"
        "from mideface_nipype.engine.atlas import load_atlas, atlas_dir;"
        "from importlib import resources;"
        f"assert pathlib.Path(mideface_nipype.__file__).is_relative_to({str(target)!r});"
        "a = load_atlas(); assert a.surface.is_watertight and len(a.labels) == 8;"
        f"assert atlas_dir().is_relative_to({str(target)!r});"
        "assert (resources.files('mideface_nipype.data') / 'dcmqa-xa30_T1w_2mm.nii.gz').is_file();"
        "print('ok')"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=other_dir, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    shipped = {p.name for p in (target / "mideface_nipype" / "atlas_data").iterdir()}
    assert {
        "head.nii.gz",
        "priors.nii.gz",
        "head.surf.gii",
        "head.label.gii",
        "README.md",
    } <= shipped
    assert not any(name.startswith("chris") for name in shipped)


def test_readme_layout_lists_every_module():
    """The README's Layout section names every subpackage and module, so the tree cannot drift."""
    layout = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    words = set(re.findall(r"[\w./]+", layout))
    package = REPO / "mideface_nipype"
    missing = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*"))
        if (path.suffix == ".py" and path.name != "__init__.py" and path.name not in words)
        or ((path / "__init__.py").exists() and f"{path.name}/" not in words)
    ]
    assert not missing, f"README's Layout misses {missing}"
