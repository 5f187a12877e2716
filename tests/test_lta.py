"""FreeSurfer LTA files as ``mideface --apply``'s REG (FreeSurfer's own --apply takes an LTA).

The LTAs here are written from nibabel's MGH header (direction cosines, voxel sizes, centre),
not from the reader's own formula, so a wrong vox2ras convention in the reader fails.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import HEADS_DIR, default_run

from mideface_nipype.cli import mideface as cli
from mideface_nipype.utils import io, lta

HEAD = "IXI012-HH-1211-T1_ds.nii.gz"
#: An oblique 2.5 mm grid (turned 20 degrees about x), off centre.
OBLIQUE = np.array(
    [
        [2.5, 0.0, 0.0, -90.0],
        [0.0, 2.5 * np.cos(0.35), -2.5 * np.sin(0.35), -110.0],
        [0.0, 2.5 * np.sin(0.35), 2.5 * np.cos(0.35), -60.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _volume_info(shape, affine) -> str:
    hdr = nib.MGHImage(np.zeros(shape[:3], np.uint8), affine).header
    mdc, delta, centre = hdr["Mdc"], hdr["delta"], hdr["Pxyz_c"]
    rows = [
        "valid = 1  # volume info valid",
        "filename = /data/some volume.mgz",
        "volume = {} {} {}".format(*shape[:3]),
        "voxelsize = {:.15e} {:.15e} {:.15e}".format(*delta),
        *(
            f"{axis}ras   = {{:.15e}} {{:.15e}} {{:.15e}}".format(*mdc[k])
            for k, axis in enumerate("xyz")
        ),
        "cras   = {:.15e} {:.15e} {:.15e}".format(*centre),
    ]
    return "\n".join(rows)


def write_lta(path: Path, ras_to_ras, src, dst, *, vox2vox: bool = False) -> Path:
    """An LTA as FreeSurfer writes it, mapping ``src`` (shape, affine) points to ``dst``'s."""
    matrix = np.linalg.inv(dst[1]) @ ras_to_ras @ src[1] if vox2vox else ras_to_ras
    kind = "0 # LINEAR_VOX_TO_VOX" if vox2vox else "1 # LINEAR_RAS_TO_RAS"
    text = [
        f"# transform file {path}",
        "# created by test on Thu Dec  3 11:00:00 2026",
        "",
        f"type      = {kind}",
        "nxforms   = 1",
        "mean      = 0.0000 0.0000 0.0000",
        "sigma     = 1.0000",
        "1 4 4",
        *(" ".join(f"{v:.15e}" for v in row) for row in matrix),
        "src volume info",
        _volume_info(*src),
        "dst volume info",
        _volume_info(*dst),
        "subject unknown",
        "fscale 0.100000",
    ]
    path.write_text("\n".join(text) + "\n")
    return path


def test_volume_info_is_the_grid_nibabel_reads():
    for shape, affine in (
        ((120, 120, 90), nib.load(HEADS_DIR / HEAD).affine),
        ((61, 80, 47), OBLIQUE),
    ):
        lines = dict(
            (k.strip(), [float(v) for v in val.split("#")[0].split()])
            for k, val in (line.split("=", 1) for line in _volume_info(shape, affine).splitlines())
            if k.strip() != "filename"
        )
        geometry = lta._geometry(lines)
        assert geometry.shape == shape and geometry.matches(shape, affine)


@pytest.mark.parametrize("vox2vox", [False, True])
def test_either_type_and_direction_give_vol_to_mask(tmp_path, vox2vox):
    vol, mask = ((61, 80, 47), OBLIQUE), ((120, 120, 90), nib.load(HEADS_DIR / HEAD).affine)
    vol_to_mask = np.eye(4)
    vol_to_mask[:3, 3] = (3.0, -20.0, 30.0)
    grids = [nib.Nifti1Image(np.zeros(s, np.uint8), a) for s, a in (vol, mask)]
    forward = write_lta(tmp_path / "f.lta", vol_to_mask, vol, mask, vox2vox=vox2vox)
    backward = write_lta(tmp_path / "b.lta", np.linalg.inv(vol_to_mask), mask, vol, vox2vox=vox2vox)
    for path in (forward, backward):
        np.testing.assert_allclose(lta.vol_to_mask_ras(path, *grids), vol_to_mask, atol=1e-6)
    other = write_lta(tmp_path / "o.lta", vol_to_mask, ((10, 10, 10), np.eye(4)), mask)
    with pytest.raises(io.InputError, match="neither") as err:
        lta.vol_to_mask_ras(other, *grids)
    assert str(other) in str(err.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ("hello\n", "not a readable FreeSurfer LTA"),
        ("type = 14\n1 4 4\n1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "LTA type 14"),
        ("type = 1\n1 4 4\n1 0 0 0\n0 1 0 0\n", "not a readable"),
        ("type = 1\n1 4 4\n0 0 0 0\n0 0 0 0\n0 0 0 0\n0 0 0 1\n", "not an invertible"),
        ("type = 0\n1 4 4\n1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "without valid volume info"),
    ],
)
def test_bad_lta_is_one_line_naming_it(tmp_path, text, words):
    path = tmp_path / "reg.lta"
    path.write_text(text)
    with pytest.raises(io.InputError, match=words) as err:
        lta.load_lta(path)
    assert str(path) in str(err.value)


@pytest.mark.slow
def test_apply_with_an_lta_is_the_apply_with_its_matrix(tmp_path, capsys):
    """The head moved 30 mm up in the scanner: its T1w's face mask through an LTA (as
    ``mri_coreg`` writes it, either direction) defaces it as the same matrix in text does."""
    mask = default_run(HEAD) / "face.mask.nii.gz"
    img = io.load_volume(HEADS_DIR / HEAD)
    moved = tmp_path / "moved.nii.gz"
    affine = img.affine.copy()
    affine[:3, 3] += (0.0, 0.0, 30.0)
    nib.save(nib.Nifti1Image(io.stored_data(img), affine, img.header), moved)
    vol_to_mask = np.eye(4)
    vol_to_mask[2, 3] = -30.0
    np.savetxt(tmp_path / "reg.txt", vol_to_mask)
    grids = ((img.shape, affine), (img.shape, img.affine))
    regs = {
        "txt": tmp_path / "reg.txt",
        "lta": write_lta(tmp_path / "reg.lta", vol_to_mask, *grids),
        "inverse lta": write_lta(tmp_path / "inv.lta", np.linalg.inv(vol_to_mask), *grids[::-1]),
    }
    outputs = {}
    for name, reg in regs.items():
        out = tmp_path / f"{name.replace(' ', '_')}.nii.gz"
        assert cli.main(["--apply", str(moved), str(mask), str(reg), str(out)]) == 0
        outputs[name] = io.stored_data(nib.load(out))
    assert np.array_equal(outputs["txt"], outputs["lta"])
    assert np.array_equal(outputs["txt"], outputs["inverse lta"])
    # the face was found where it moved: as many voxels changed as on the head in place
    changed = np.count_nonzero(outputs["lta"] != io.stored_data(img))
    in_place = np.count_nonzero(
        io.stored_data(nib.load(default_run(HEAD) / "defaced.nii.gz")) != io.stored_data(img)
    )
    assert changed > 0.9 * in_place
    bad = tmp_path / "bad.mat"
    bad.write_text("junk")
    capsys.readouterr()
    assert cli.main(["--apply", str(moved), str(mask), str(bad), str(tmp_path / "x.nii.gz")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert str(bad) in line and "ITK/ANTs" in line
