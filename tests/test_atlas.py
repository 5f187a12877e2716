"""The face atlas: loader, invariants, and that the build script reproduces the committed files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ATLAS_SOURCES_DIR
from scipy import sparse
from scipy.sparse import csgraph

from mideface_nipype.engine import atlas as atlas_mod
from mideface_nipype.engine import bracket, register
from mideface_nipype.engine.atlas import load_atlas

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def atlas():
    return load_atlas()


def test_loader_returns_everything(atlas):
    assert isinstance(atlas.head, nib.Nifti1Image) and atlas.head.ndim == 3
    assert set(atlas.priors) == set(atlas_mod.CLASSES)
    assert set(atlas.labels) == set(atlas_mod.LABELS)
    assert len(atlas.watermark) > 100
    assert atlas.meta["ripple"]["period_mm"] == 30.0


def test_labels_non_empty_and_disjoint(atlas):
    seen = np.zeros(len(atlas.surface.vertices), dtype=int)
    for name, idx in atlas.labels.items():
        assert len(idx) > 300, name
        seen[idx] += 1
    assert seen.max() == 1


def test_labels_sit_where_their_names_say(atlas):
    v = atlas.surface.vertices
    centre = {name: v[idx].mean(axis=0) for name, idx in atlas.labels.items()}
    assert centre["nose"][1] > centre["eyes"][1] and abs(centre["nose"][0]) < 5
    assert centre["lower-face"][2] < centre["nose"][2] < centre["forehead"][2]
    assert centre["ear-left"][0] < -60 and centre["ear-right"][0] > 60
    assert centre["back-of-head"][1] < -70
    eyes = v[atlas.labels["eyes"]]
    assert (eyes[:, 0] < -15).sum() > 100 and (eyes[:, 0] > 15).sum() > 100
    face = np.concatenate([atlas.labels[n] for n in ("lower-face", "upper-face", "nose")])
    assert np.isin(atlas.watermark, face).all()


#: Least share of each peer's face skin (below the brow, atlas outer skin) that the default
#: labels cover. AFNI's face shell also covers the skin behind and below the ears (mastoid,
#: side of the neck), which is no face; its whole-head shell covers the scalp too.
MIN_PEER_COVERAGE = {"pydeface": 0.95, "caideface": 0.95, "afni-refacer-face": 0.75}


def test_labels_cover_the_peers_face_regions(atlas):
    coverage = atlas.meta["peer_coverage"]
    for peer, least in MIN_PEER_COVERAGE.items():
        assert coverage[peer] >= least, (peer, coverage[peer])


def test_face_labels_are_anatomical(atlas):
    """The face reaches from the brow ridge to under the chin and back to the ears; eyes and
    nose sit where the landmarks are; every face label is one connected patch of skin."""
    v = atlas.surface.vertices
    marks = atlas.meta["face_landmarks_mm"]
    face = np.concatenate([atlas.labels[n] for n in ("lower-face", "upper-face", "nose", "eyes")])
    fv = v[face]
    assert fv[:, 2].max() <= marks["brow_z"] + 1 and fv[:, 2].max() > marks["brow_z"] - 4
    assert fv[:, 2].min() < marks["menton_z"] - 5  # the chin's underside
    # below the neck's cut only the chin's front, down to where it turns under (z -140)
    below_cut = fv[fv[:, 2] < marks["neck_cut_z"]]
    assert len(below_cut) > 100 and below_cut[:, 1].min() > 40
    assert marks["jaw_front_yz"][1] < below_cut[:, 2].min() < marks["neck_cut_z"] - 3
    assert fv[:, 1].min() < 0  # the cheeks reach back to the ears (pre-auricular skin)
    assert np.abs(fv[:, 0]).max() > 70
    eyes = v[atlas.labels["eyes"]]
    cx, cy, cz = marks["eyelid_centre"]
    for side in (-1, 1):
        half = eyes[np.sign(eyes[:, 0]) == side]
        assert np.abs(half.mean(0) - [side * cx, cy, cz]).max() < 6
    nose = v[atlas.labels["nose"]]
    assert np.abs(nose[:, 0]).max() <= marks["nose_half_width_at_z"][1][1] + 0.5
    assert nose[:, 1].max() > v[atlas.labels["eyes"], 1].max()
    edges = atlas.surface.edges_unique
    for name in ("lower-face", "upper-face", "nose"):
        inside = np.zeros(len(v), bool)
        inside[atlas.labels[name]] = True
        keep = edges[inside[edges].all(1)]
        graph = sparse.coo_matrix((np.ones(len(keep)), keep.T), shape=(len(v), len(v)))
        _, comp = csgraph.connected_components(graph, directed=False)
        sizes = np.bincount(comp[inside])
        assert sizes.max() >= 0.98 * inside.sum(), name


def test_surface_watertight_outward_and_fine(atlas):
    mesh = atlas.surface
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 3e6  # mm^3: a whole adult head
    outward = np.einsum("ij,ij->i", mesh.vertex_normals, mesh.vertices - mesh.centroid) > 0
    assert outward.mean() > 0.95
    edges = mesh.edges_unique_length
    assert 0.8 < np.median(edges) < 2.0 and edges.max() < 4.0


def test_priors_sum_to_one_and_are_probabilities(atlas):
    stack = np.stack([np.asarray(img.dataobj) for img in atlas.priors.values()], -1)
    assert stack.min() >= 0 and stack.max() <= 1 + 1e-6
    assert np.abs(stack.sum(-1) - 1).max() <= 1e-3
    assert max(atlas_mod.PRIOR_MM, *nib.affines.voxel_sizes(atlas.head.affine)) <= 2.0
    for name, img in atlas.priors.items():
        assert np.asarray(img.dataobj).max() > 0.5, name
        assert np.allclose(img.affine, atlas.head.affine)


def test_priors_are_anatomical(atlas):
    """Brain inside bone inside soft tissue; the eyes in front of the brain."""
    aff = atlas.head.affine
    ijk = np.round(np.linalg.inv(aff) @ np.array([0.0, 0.0, 20.0, 1.0]))[:3].astype(int)
    wm = np.asarray(atlas.priors["wm"].dataobj)
    assert wm[tuple(ijk)] > 0.5 or np.asarray(atlas.priors["gm"].dataobj)[tuple(ijk)] > 0.3
    eyes = np.asarray(atlas.priors["eyes"].dataobj)
    eye_xyz = nib.affines.apply_affine(aff, np.argwhere(eyes > 0.5))
    assert eye_xyz[:, 1].min() > 40 and (eye_xyz[:, 0] < 0).any() and (eye_xyz[:, 0] > 0).any()
    # along a ray straight up from the centre: brain, then bone, then soft tissue, then air
    column = [np.asarray(atlas.priors[c].dataobj)[ijk[0], ijk[1], ijk[2] :] for c in atlas.priors]
    labels = np.argmax(np.stack(column, -1), -1)
    order = [atlas_mod.CLASSES[i] for i in labels[np.r_[True, labels[1:] != labels[:-1]]]]
    assert order.index("bone") > max(order.index(c) for c in ("wm", "gm", "csf") if c in order)
    assert order.index("soft") > order.index("bone") and order[-1] == "air"


def test_rebuild_reproduces_committed_atlas(tmp_path, atlas):
    """Running the build script from the sources gives the committed labels and priors."""
    subprocess.run(
        [
            sys.executable,
            str(REPO / "atlas" / "build_atlas.py"),
            "--sources",
            str(ATLAS_SOURCES_DIR),
            "--out",
            str(tmp_path),
            "--no-qa",
        ],
        check=True,
    )
    rebuilt = load_atlas(tmp_path)
    for name in atlas_mod.LABELS:
        assert np.array_equal(rebuilt.labels[name], atlas.labels[name]), name
    assert np.array_equal(rebuilt.watermark, atlas.watermark)
    assert rebuilt.meta == atlas.meta
    assert np.allclose(rebuilt.surface.vertices, atlas.surface.vertices, atol=1e-3)
    for name in atlas_mod.CLASSES:
        a = np.asarray(rebuilt.priors[name].dataobj)
        b = np.asarray(atlas.priors[name].dataobj)
        assert np.abs(a - b).max() <= 1e-3, name
    assert (
        np.abs(
            np.asarray(rebuilt.head.dataobj, float) - np.asarray(atlas.head.dataobj, float)
        ).max()
        <= 1
    )


@pytest.mark.parametrize("mirror", [False, True], ids=["turned", "mirrored"])
def test_projected_surface_is_the_atlas_moved_and_still_wound_outward(atlas, mirror):
    """``project_surface`` moves every vertex off the face through the inverse registration and
    the face's inside by its similarity part (distances scaled alike in every direction), keeps
    each vertex's label, and keeps the triangles wound outward when the registration mirrors."""
    subject_to_atlas = np.array(
        [[0.0, 1.05, 0.0, -4.0], [-0.95, 0.0, 0.0, 12.0], [0.0, 0.0, 1.1, -30.0], [0, 0, 0, 1.0]]
    )
    if mirror:
        subject_to_atlas = subject_to_atlas @ np.diag([-1.0, 1.0, 1.0, 1.0])
    vertices, faces, regions = register.project_surface(atlas, subject_to_atlas)
    source = np.asarray(atlas.surface.vertices)
    face = atlas.in_labels(bracket.FACE_LABEL_NAMES)
    weight = bracket.offset_field(source, face, faces, 1.0, register.SIMILAR_FACE_TAPER_MM)
    back = vertices @ subject_to_atlas[:3, :3].T + subject_to_atlas[:3, 3]
    assert np.allclose(back[weight == 0], source[weight == 0], atol=1e-9)
    assert (weight == 1).sum() > 1000
    # deep in the face: distances all scaled by the cube root of the volume change
    inner = np.flatnonzero(weight == 1)[::50]
    scale = np.cbrt(abs(np.linalg.det(np.linalg.inv(subject_to_atlas)[:3, :3])))
    moved = np.linalg.norm(vertices[inner, None] - vertices[None, inner], axis=-1)
    atlas_mm = np.linalg.norm(source[inner, None] - source[None, inner], axis=-1)
    assert np.allclose(moved, scale * atlas_mm, atol=1e-6)
    assert not np.allclose(back[inner], source[inner], atol=1.0)  # so it is not the affine
    # no seam: along every edge the move differs from the affine's by a bounded step
    off = np.linalg.norm(back - source, axis=1)
    edges = np.asarray(atlas.surface.edges_unique)
    assert np.abs(off[edges[:, 0]] - off[edges[:, 1]]).max() < 1.0
    for i, name in enumerate(atlas_mod.LABELS):
        assert np.array_equal(np.flatnonzero(regions == i + 1), atlas.labels[name]), name
    # the enclosed volume is positive only when the triangles are wound outward
    corners = vertices[faces]
    area = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    assert np.einsum("ij,ij->", corners.mean(1) - vertices.mean(0), area) > 0


def test_registration_sees_the_atlas_above_its_floor_and_the_labels_reach_the_chin(atlas):
    """The atlas holds the whole chin for the face labels; registration sees the head above
    ``ATLAS_FLOOR_Z_MM`` only (the jaw moves with the mouth)."""
    full, head = atlas.head_image(), register.atlas_head(atlas)
    n_slices = head.data.shape[2]
    assert 0 < n_slices < full.data.shape[2]
    assert np.array_equal(head.data, full.data[:, :, -n_slices:])
    assert np.array_equal(head.mask, full.mask[:, :, -n_slices:])
    assert np.array_equal(head.affine[:, :3], full.affine[:, :3])
    floor_mm, spacing_mm = head.affine[2, 3], head.affine[2, 2]
    assert floor_mm - spacing_mm < register.ATLAS_FLOOR_Z_MM <= floor_mm
    chin = atlas.surface.vertices[atlas.labels["lower-face"]]
    assert chin[:, 2].min() < register.ATLAS_FLOOR_Z_MM - 5


def test_head_image_is_the_average_head_and_its_mask(atlas):
    head = atlas.head_image()
    assert head.data.dtype == np.float32 and head.mask.dtype == bool
    assert head.data.shape == head.mask.shape == atlas.head.shape
    assert np.array_equal(head.affine, atlas.head.affine)
    assert head.data[head.mask].mean() > 5 * max(float(head.data[~head.mask].mean()), 1e-6)
