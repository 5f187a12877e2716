"""Multi-contrast defacing: the face mask made on a T1w defaces the other contrasts."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from brain import independent_brain_mask
from conftest import FACE_HEADS, HEADS_DIR
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from mideface_nipype.cli import mideface as cli
from mideface_nipype.engine import apply, fill
from mideface_nipype.utils import geometry, io
from mideface_nipype.workflows.base import init_mideface_wf, run_workflow
from mideface_nipype.workflows.outputs import Outputs

#: Every test here runs the engine on real heads (or needs a run that does).
pytestmark = pytest.mark.slow

#: The synthetic second contrast: rotation (degrees about x, y, z), voxel size (mm).
SYNTH_ROTATION_DEG = (15.0, -8.0, 10.0)
SYNTH_VOXEL_MM = 2.5


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def make_second_contrast(t1_path, out_path) -> np.ndarray:
    """A T2-like image of a real T1w head: remapped intensities, rotated, regridded, biased, noisy.

    Returns the known 4x4 RAS matrix mapping the new image's mm to the T1w's mm.
    """
    img = nib.load(t1_path)
    t1 = io.first_frame(img)
    head = ndi.binary_fill_holes(ndi.gaussian_filter(t1, 1) > 0.3 * np.median(t1[t1 > t1.mean()]))
    hi = np.percentile(t1[head], 99)
    # T2-like: dark white matter, bright fluid; air stays dark
    t2 = np.where(head, 0.25 * hi + 0.9 * (hi - np.clip(t1, 0, hi)), 0.02 * hi)
    centre = geometry.apply_affine(img.affine, np.argwhere(head).mean(0)[None])[0]
    rot = np.eye(4)
    rot[:3, :3] = Rotation.from_euler("xyz", SYNTH_ROTATION_DEG, degrees=True).as_matrix()
    rot[:3, 3] = centre - rot[:3, :3] @ centre
    shape, grid = geometry.iso_grid(t1.shape, img.affine, SYNTH_VOXEL_MM)
    new_affine = rot @ grid  # the head turned in the scanner, on a coarser grid
    new_to_t1 = np.linalg.inv(rot)  # world point q of the new image shows the T1w's rot^-1 q
    data = geometry.resample(t2, img.affine, shape, new_affine, target_to_source=new_to_t1)
    xyz = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    bias = np.exp(0.25 * xyz[..., 0] - 0.2 * xyz[..., 2] + 0.1 * xyz[..., 1] ** 2)
    noise = np.random.default_rng(0).normal(0, 0.02 * hi, shape)
    data = np.clip(data * bias + noise, 0, None).astype(np.float32)
    nib.save(nib.Nifti1Image(data, new_affine), out_path)
    return new_to_t1


@pytest.fixture(scope="module")
def chris_run(tmp_path_factory):
    odir = tmp_path_factory.mktemp("chris")
    code = cli.main(
        [
            "--i",
            str(HEADS_DIR / "chris_T1w.nii.gz"),
            "--odir",
            str(odir),
            "--apply-to",
            str(HEADS_DIR / "chris_PD.nii.gz"),
        ]
    )
    assert code == 0
    return odir


def test_pd_defaced_with_t1w_mask_brain_untouched(chris_run):
    pd_path = HEADS_DIR / "chris_PD.nii.gz"
    pd = nib.load(pd_path)
    out = nib.load(chris_run / "chris_PD_defaced.nii.gz")
    assert out.shape == pd.shape and out.get_data_dtype() == pd.get_data_dtype()
    assert np.allclose(out.affine, pd.affine)
    before, after = io.stored_data(pd), io.stored_data(out)
    changed = before != after
    changed[: len(fill.CODE_TAG), 0, 0] = False
    # the T1w's independent brain mask, carried to the PD grid by the shared scanner space
    t1 = nib.load(HEADS_DIR / "chris_T1w.nii.gz")
    brain_t1 = independent_brain_mask(str(HEADS_DIR / "chris_T1w.nii.gz"))
    brain_pd = apply.resample_protection(brain_t1, t1.affine, pd.shape, pd.affine)
    assert brain_pd.sum() > 10_000
    assert np.count_nonzero(changed & brain_pd) == 0
    # the face is in view on this slab (eyes, upper nose): it was replaced, in front of the brain
    assert changed.sum() > 5_000
    xyz = geometry.apply_affine(pd.affine, np.argwhere(changed))
    assert (
        np.median(xyz[:, 1])
        > geometry.apply_affine(pd.affine, np.argwhere(brain_pd))[:, 1].max() - 40
    )
    assert fill.check_code(after)


def test_apply_standalone_matches_regheader(chris_run, tmp_path, capsys):
    """FreeSurfer's --apply VOL FACEMASK regheader OUT on the PD slab."""
    out = tmp_path / "pd_applied.nii.gz"
    code = cli.main(
        [
            "--apply",
            str(HEADS_DIR / "chris_PD.nii.gz"),
            str(chris_run / "face.mask.nii.gz"),
            "regheader",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    assert code == 0
    # one ApplyFaceMask node and the sink published OUT (init_apply_wf), no hand-written path
    node_dirs = {p.name for p in (tmp_path / "work" / "apply_wf").rglob("*") if p.is_dir()}
    assert {"apply_mask", "publish"} <= node_dirs
    after = io.stored_data(nib.load(out))
    before = io.stored_data(nib.load(HEADS_DIR / "chris_PD.nii.gz"))
    assert np.count_nonzero(after != before) > 5_000
    bad = cli.main(
        [
            "--apply",
            str(out),
            str(chris_run / "face.mask.nii.gz"),
            "nope.mat",
            str(tmp_path / "x.nii.gz"),
        ]
    )
    assert bad == 1 and "nope.mat" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.parametrize("name", FACE_HEADS)
def test_synthetic_second_contrast_through_the_workflow(name, tmp_path):
    t1_path = HEADS_DIR / name
    syn_path = tmp_path / "syn_T2w.nii.gz"
    syn_to_t1 = make_second_contrast(t1_path, syn_path)
    names = ("face_mask", "exclusion_mask", "other_face_masks", "other_out_files")
    outputs = {key: [str(tmp_path / "out" / f"{key}.nii.gz")] for key in names}
    wf = init_mideface_wf(
        name="multi",
        in_file=t1_path,
        other_contrasts=[str(syn_path)],
        outputs=Outputs(destinations=outputs),
    )
    run_workflow(wf, tmp_path / "work")
    outputs = {key: paths[0] for key, paths in outputs.items()}
    syn = nib.load(syn_path)
    t1 = nib.load(t1_path)
    face_t1 = np.asarray(nib.load(outputs["face_mask"]).dataobj)
    face_syn = np.asarray(nib.load(outputs["other_face_masks"]).dataobj)
    expected = apply.resample_labels(face_t1, t1.affine, syn.shape, syn.affine, syn_to_t1)
    xmask_syn = apply.resample_protection(
        np.asarray(nib.load(outputs["exclusion_mask"]).dataobj),
        t1.affine,
        syn.shape,
        syn.affine,
        syn_to_t1,
    )
    expected[xmask_syn] = 0
    assert _dice(face_syn > 0, expected > 0) >= 0.9
    before = io.stored_data(syn)
    after = io.stored_data(nib.load(outputs["other_out_files"]))
    changed = before != after
    changed[: len(fill.CODE_TAG), 0, 0] = False
    assert changed.sum() > 0.5 * np.count_nonzero(face_syn)
    # a brain voxel of the new grid: its centre lies in the brain (known transform)
    brain = apply.resample_labels(
        independent_brain_mask(str(t1_path)), t1.affine, syn.shape, syn.affine, syn_to_t1
    )
    assert brain.sum() > 10_000
    assert np.count_nonzero(changed & (brain > 0)) == 0
    assert np.count_nonzero(changed & xmask_syn) == 0
