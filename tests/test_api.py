"""``mideface_nipype.deface``: in memory, the same bytes as the ``mideface`` command."""

from __future__ import annotations

import tempfile

import nibabel as nib
import numpy as np
import pytest
from conftest import HEADS_DIR

import mideface_nipype
from mideface_nipype.cli import mideface as cli
from mideface_nipype.utils import io

FROM_FILE = HEADS_DIR / "IXI013-HH-1212-T1_ds.nii.gz"
IN_MEMORY = HEADS_DIR / "dcmqa-xa30_T1w_2mm.nii.gz"


def assert_same_image(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage):
    assert type(a) is type(b)
    assert np.array_equal(a.affine, b.affine)
    assert a.header.binaryblock == b.header.binaryblock
    stored_a, stored_b = io.stored_data(a), io.stored_data(b)
    assert stored_a.dtype == stored_b.dtype and np.array_equal(stored_a, stored_b)


@pytest.fixture(scope="module")
def private_tmp(tmp_path_factory):
    """The temporary folder ``deface`` may use, to check that it leaves nothing there."""
    folder = tmp_path_factory.mktemp("tempdir")
    saved, tempfile.tempdir = tempfile.tempdir, str(folder)
    yield folder
    tempfile.tempdir = saved


@pytest.mark.slow
def test_deface_of_a_loaded_file_equals_the_command(tmp_path, private_tmp):
    result = mideface_nipype.deface(nib.load(FROM_FILE), seed=7)
    assert list(private_tmp.iterdir()) == []  # nothing left behind

    out, face = tmp_path / "out.nii.gz", tmp_path / "face.nii.gz"
    args = ["--i", FROM_FILE, "--o", out, "--facemask", face, "--seed", "7"]
    assert cli.main([str(a) for a in args]) == 0
    assert_same_image(result.defaced, nib.load(out))
    assert np.array_equal(np.asarray(result.face_mask.dataobj), np.asarray(nib.load(face).dataobj))

    original = io.stored_data(nib.load(FROM_FILE))
    changed = io.stored_data(result.defaced) != original
    exclusion = np.asarray(result.exclusion_mask.dataobj) > 0
    assert changed.sum() > 10_000 and not (changed & exclusion).any()
    assert result.transform.shape == (4, 4) and "registration" in result.stats


@pytest.mark.slow
def test_deface_of_an_image_built_in_memory_with_another_contrast(tmp_path, private_tmp):
    """A notebook's image (an array and an affine, no file) and a second contrast."""
    loaded = nib.load(IN_MEMORY)
    data = np.asarray(loaded.dataobj, dtype=np.float32)
    img = nib.Nifti1Image(data, loaded.affine)
    head = data > np.percentile(data, 60)
    t2 = nib.Nifti1Image(np.where(head, data.max() - data, data), loaded.affine)
    result = mideface_nipype.deface(img, other=[t2], regheader=True, samseg=False)
    assert list(private_tmp.iterdir()) == []

    in_file, t2_file = tmp_path / "img.nii", tmp_path / "t2.nii"
    nib.save(img, in_file)
    nib.save(t2, t2_file)
    out = tmp_path / "out" / "img_defaced.nii"
    args = ["--i", in_file, "--o", out, "--apply-to", t2_file, "--regheader", "--no-samseg"]
    assert cli.main([str(a) for a in args]) == 0
    assert_same_image(result.defaced, nib.load(out))
    assert len(result.other) == 1
    assert_same_image(result.other[0], nib.load(out.parent / "t2_defaced.nii"))

    written = result.save(tmp_path / "saved")
    assert_same_image(nib.load(written["defaced"]), result.defaced)
    with pytest.raises(io.OutputError, match="already exists"):
        result.save(tmp_path / "saved")


def test_bad_image_is_refused_naming_it_before_any_work(private_tmp):
    flat = nib.Nifti1Image(np.ones((40, 40, 1), dtype=np.float32), np.eye(4))
    with pytest.raises(io.InputError, match="^the input image: is 2-D"):
        mideface_nipype.deface(flat)
    assert list(private_tmp.iterdir()) == []
