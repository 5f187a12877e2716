"""Tests of the bracketing engine on a real head (IXI012, PSR-oriented) and on analytic spheres.

The "template" surfaces are derived from the real head itself (the atlas is built elsewhere):
marching cubes of the smoothed (or eroded) head mask, mapped to world mm through the image affine.
"""

import json

import nibabel as nib
import numpy as np
import pytest
import trimesh
from conftest import HEADS_DIR
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

from mideface_nipype.engine import bracket as bk

REAL_HEAD = HEADS_DIR / "IXI012-HH-1211-T1_ds.nii.gz"
ERODE_VOX = 3


def _to_world(points_vox, affine):
    return points_vox @ affine[:3, :3].T + affine[:3, 3]


def _surface(mask, affine, sigma_vox):
    """Outward-wound marching-cubes surface of a smoothed mask, in world mm."""
    smooth = ndi.gaussian_filter(mask.astype(float), sigma_vox)
    verts_vox, faces, _, _ = marching_cubes(np.pad(smooth, 1), 0.5)
    verts = _to_world(verts_vox - 1, affine)
    corners = verts[faces]
    signed_volume = np.einsum("ij,ij->", corners[:, 0], np.cross(corners[:, 1], corners[:, 2]))
    if signed_volume < 0:
        faces = faces[:, ::-1]
    return verts, np.ascontiguousarray(faces)


def _face_labels(verts):
    """Face regions as world-coordinate boxes (anterior = +y in RAS) around the head centre."""
    x, y, z = (verts - verts.mean(axis=0)).T
    anterior = y > 40
    return {
        "lower-face": np.flatnonzero(anterior & (z < -10)),
        "upper-face": np.flatnonzero(anterior & (z >= -10) & (z < 40) & (np.abs(x) > 20)),
        "nose": np.flatnonzero(anterior & (z >= -10) & (z < 20) & (np.abs(x) <= 20)),
        "eyes": np.flatnonzero(anterior & (z >= 20) & (z < 40) & (np.abs(x) <= 20)),
    }


def _voxel_centres_mm(shape, affine):
    ijk = np.indices(shape).reshape(3, -1).T
    return _to_world(ijk.astype(float), affine).reshape(*shape, 3)


def _near_vertices(points_mm, shape, affine, radius_mm):
    """Voxels whose centre lies within ``radius_mm`` of any of the points."""
    centres = _voxel_centres_mm(shape, affine).reshape(-1, 3)
    dist_mm = cKDTree(points_mm).query(centres, distance_upper_bound=radius_mm)[0]
    return (dist_mm < np.inf).reshape(shape)


@pytest.fixture(scope="module")
def real_head():
    img = nib.load(REAL_HEAD)
    data = np.asarray(img.dataobj, dtype=float)
    labelled, _ = ndi.label(data > 100)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    head = ndi.binary_fill_holes(labelled == sizes.argmax())
    return head, img.affine


@pytest.fixture(scope="module")
def eroded_surface(real_head):
    head, affine = real_head
    return _surface(ndi.distance_transform_edt(head) > ERODE_VOX, affine, 1.0)


@pytest.fixture(scope="module")
def template(real_head):
    """A smooth "average-like" head surface: outside the skin in hollows, inside at bumps."""
    head, affine = real_head
    verts, faces = _surface(head, affine, 2.0)
    return verts, faces, _face_labels(verts)


@pytest.fixture(scope="module")
def base_result(real_head, template):
    head, affine = real_head
    verts, faces, labels = template
    return bk.bracket_face(head, affine, verts, faces, labels)


def test_select_labels_order():
    assert bk.select_labels() == bk.FACE_LABELS + bk.EAR_LABELS
    assert bk.select_labels(ears=False) == bk.FACE_LABELS
    everything = bk.select_labels(forehead=True, back_of_head=True)
    assert [s.name for s in everything[-4:]] == [
        "ear-left",
        "ear-right",
        "forehead",
        "back-of-head",
    ]
    assert bk.FACE_LABELS[0] == bk.LabelSpec(
        "lower-face", 2.0, 20.0, bk.FACE_OFFSET_MM, bk.LOWER_FACE_DIST_OUT_MAX_MM
    )
    assert bk.FACE_LABELS[2] == bk.LabelSpec("nose", 2.0, 20.0, -bk.NOSE_PULL_MM)
    assert bk.FOREHEAD_LABEL.dist_in_max_mm == 3.0


def test_step_size_mm():
    assert bk.step_size_mm(np.diag([2.0, 2.0, 2.0, 1.0])) == pytest.approx(2 / 3)
    rotation = trimesh.transformations.rotation_matrix(0.4, [1, 2, 3])[:3, :3]
    oblique = np.eye(4)
    oblique[:3, :3] = rotation @ np.diag([1.2, 0.9, 3.0])
    oblique[:3, 3] = [10, -20, 5]
    assert bk.step_size_mm(oblique) == pytest.approx(0.3)


def test_vertex_normals_outward_unit_and_winding_independent(eroded_surface):
    verts, faces = eroded_surface
    normals = bk.vertex_normals(verts, faces)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0)
    outward = np.einsum("ij,ij->i", normals, verts - verts.mean(axis=0)) > 0
    assert outward.mean() > 0.8  # real heads have hollows (ears, eyes), hence not all
    reference = trimesh.Trimesh(verts, faces, process=False).vertex_normals
    assert np.mean(np.einsum("ij,ij->i", normals, reference) > 0.9) > 0.95
    np.testing.assert_allclose(bk.vertex_normals(verts, faces[:, ::-1]), normals)


def test_emboss_moves_only_selected_vertices():
    verts = np.arange(12.0).reshape(4, 3)
    normals = np.tile([0.0, 0.0, 1.0], (4, 1))
    out = bk.emboss(verts, normals, [1, 3], 5.0)
    np.testing.assert_allclose(out[[0, 2]], verts[[0, 2]])
    np.testing.assert_allclose(out[[1, 3]] - verts[[1, 3]], [[0, 0, 5], [0, 0, 5]])
    np.testing.assert_allclose(verts, np.arange(12.0).reshape(4, 3))


def test_ripple_radial_formula_and_centre():
    rng = np.random.default_rng(0)
    centre = np.array([10.0, -50.0, -70.0])
    verts = centre + rng.normal(scale=40.0, size=(200, 3))
    idx = np.arange(0, 200, 2)
    spec = bk.Ripple(tuple(centre), amp_mm=2.0, period_mm=30.0)
    out = bk.ripple(verts, idx, spec)
    rel, new_rel = verts[idx] - centre, out[idx] - centre
    r, new_r = np.linalg.norm(rel, axis=1), np.linalg.norm(new_rel, axis=1)
    theta = np.arccos(rel[:, 2] / r)
    np.testing.assert_allclose(new_r, r + 2.0 * np.sin(2 * np.pi * r * theta / 30.0))
    np.testing.assert_allclose(new_rel / new_r[:, None], rel / r[:, None], atol=1e-12)
    np.testing.assert_array_equal(out[1::2], verts[1::2])
    shifted = bk.ripple(verts + 7.0, idx, bk.Ripple(tuple(centre + 7.0), 2.0, 30.0))
    np.testing.assert_allclose(shifted, out + 7.0)


def _oblique_affine(shape):
    """1 mm voxels, rotated and translated so that no axis is aligned with world axes."""
    affine = np.eye(4)
    affine[:3, :3] = trimesh.transformations.rotation_matrix(0.7, [1, -2, 0.5])[:3, :3]
    affine[:3, 3] = [-12.0, 30.0, 7.0]
    centre = _to_world((np.asarray(shape) - 1) / 2.0, affine)
    return affine, centre


def _reference_search(point, normal, head, affine, max_mm, step_mm, outward, pad_vox):
    """Scalar transcription of the spec's while loop, for comparison."""
    inv = np.linalg.inv(affine)
    d_mm = 0.0
    k = 0
    while k * step_mm < max_mm:
        d_mm = k * step_mm
        p = point + (d_mm if outward else -d_mm) * normal
        ijk = np.rint(inv[:3, :3] @ p + inv[:3, 3]).astype(int)
        if np.any(ijk < pad_vox) or np.any(ijk > np.array(head.shape) - 1 - pad_vox):
            return d_mm
        if bool(head[tuple(ijk)]) != outward:
            return d_mm
        k += 1
    return k * step_mm


def test_search_distances_sphere_analytic():
    shape = (64, 64, 64)
    affine, centre = _oblique_affine(shape)
    radius_mm = 15.0
    ball = np.linalg.norm(_voxel_centres_mm(shape, affine) - centre, axis=-1) <= radius_mm
    step_mm = bk.step_size_mm(affine)
    sphere = trimesh.creation.icosphere(subdivisions=3)
    for r_mm in (10.0, 22.0):
        verts = centre + r_mm * sphere.vertices
        normals = bk.vertex_normals(verts, sphere.faces)
        kwargs = {"max_mm": 20.0, "step_mm": step_mm}
        d_in = bk.search_distances(verts, normals, ball, affine, outward=False, **kwargs)
        d_out = bk.search_distances(verts, normals, ball, affine, outward=True, **kwargs)
        inside = r_mm < radius_mm
        if inside:
            np.testing.assert_array_equal(d_in, 0.0)
            np.testing.assert_allclose(d_out, radius_mm - r_mm, atol=1.0)
        else:
            np.testing.assert_array_equal(d_out, 0.0)
            np.testing.assert_allclose(d_in, r_mm - radius_mm, atol=1.0)
        for outward, got in ((False, d_in), (True, d_out)):
            expected = [
                _reference_search(p, n, ball, affine, 20.0, step_mm, outward, bk.EDGE_PAD_VOX)
                for p, n in zip(verts[::7], normals[::7], strict=True)
            ]
            np.testing.assert_allclose(got[::7], expected)


def test_search_distances_max_and_edge_pad():
    affine = np.eye(4)
    point, normal = np.array([[16.0, 16.0, 16.0]]), np.array([[1.0, 0.0, 0.0]])
    empty, full = np.zeros((32, 32, 32), bool), np.ones((32, 32, 32), bool)
    step_mm = 1 / 3
    inward = bk.search_distances(
        point, normal, empty, affine, max_mm=5.0, step_mm=step_mm, outward=False
    )
    np.testing.assert_allclose(inward, [5.0])
    # Head everywhere: only the pad stops the search, at the first sample rounding to index 27.
    outward = bk.search_distances(
        point, normal, full, affine, max_mm=100.0, step_mm=step_mm, outward=True
    )
    np.testing.assert_allclose(outward, [32 * step_mm])
    wider = bk.search_distances(
        point, normal, full, affine, max_mm=100.0, step_mm=step_mm, outward=True, pad_vox=0
    )
    np.testing.assert_allclose(wider, [47 * step_mm])


def test_search_distances_real_eroded_head(real_head, eroded_surface):
    head, affine = real_head
    verts, faces = eroded_surface
    normals = bk.vertex_normals(verts, faces)
    step_mm = bk.step_size_mm(affine)
    d_in = bk.search_distances(
        verts, normals, head, affine, max_mm=20.0, step_mm=step_mm, outward=False
    )
    d_out = bk.search_distances(
        verts, normals, head, affine, max_mm=100.0, step_mm=step_mm, outward=True
    )
    np.testing.assert_array_equal(d_in, 0.0)
    expected_mm = ERODE_VOX * 2.0
    assert np.median(d_out) == pytest.approx(expected_mm, abs=2 * step_mm)
    assert np.mean(np.abs(d_out - expected_mm) <= 2.0 + 2 * step_mm) > 0.75


def test_search_distances_same_for_any_memory_order(real_head, eroded_surface):
    """A mask as nibabel reads it (Fortran order), in C order and as numbers gives the same
    distances: voxels are looked up in the mask's own memory order, not copied."""
    head, affine = real_head
    verts, faces = eroded_surface
    normals = bk.vertex_normals(verts, faces)
    step_mm = bk.step_size_mm(affine)
    masks = [np.ascontiguousarray(head > 0.5), np.asfortranarray(head > 0.5)]
    masks.append(np.asfortranarray(head).astype(np.float32))
    assert masks[1].flags.f_contiguous and not masks[1].flags.c_contiguous
    for outward in (False, True):
        found = [
            bk.search_distances(
                verts, normals, m, affine, max_mm=30.0, step_mm=step_mm, outward=outward
            )
            for m in masks
        ]
        assert found[0].any() or not outward
        for other in found[1:]:
            np.testing.assert_array_equal(other, found[0])


def test_label_bounds_percentile_and_clamp():
    spec = bk.LabelSpec("x")
    d_in, d_out = bk.label_bounds(np.arange(10.0)[::-1], np.arange(10.0), spec)
    assert (d_in, d_out) == (8.0, 9.0)  # index round(9 * 0.9) = 8 of the sorted values; max
    # nint rounds half up: (6 - 1) * 0.9 = 4.5 -> index 5.
    assert bk.label_bounds(np.arange(6.0), np.arange(6.0), spec)[0] == 5.0
    assert bk.label_bounds(np.zeros(5), np.zeros(5), spec) == (2.0, 2.0)
    assert bk.label_bounds(np.ones(5), np.ones(5), bk.LabelSpec("y", 4.0, 9.0))[0] == 4.0
    assert bk.label_bounds([1.0], [1.0], spec, dist_out_min_mm=0.5) == (2.0, 1.0)
    assert bk.label_bounds(np.arange(11.0), np.arange(11.0), spec, dist_in_frac=0.5) == (
        5.0,
        10.0,
    )
    with pytest.raises(ValueError, match="without vertices"):
        bk.label_bounds([], [], spec)


@pytest.mark.parametrize("dist_mm", [6.0, -6.0])
def test_shell_voxels_sphere_is_solid_and_tight(dist_mm):
    shape = (64, 64, 64)
    affine, centre = _oblique_affine(shape)
    r_mm = 18.0 if dist_mm > 0 else 24.0
    sphere = trimesh.creation.icosphere(subdivisions=4)
    verts = centre + r_mm * sphere.vertices
    normals = bk.vertex_normals(verts, sphere.faces)
    flat = bk.shell_voxels(
        verts, normals, sphere.faces, dist_mm, bk.step_size_mm(affine), shape, affine
    )
    assert np.all(np.diff(flat) > 0)
    covered = np.zeros(shape, bool).ravel()
    covered[flat] = True
    radius = np.linalg.norm(_voxel_centres_mm(shape, affine) - centre, axis=-1).ravel()
    inner, outer = sorted((r_mm, r_mm + dist_mm))
    must = (radius >= inner + 0.5) & (radius <= outer - 0.5)
    assert must.sum() > 10000
    assert covered[must].all(), f"{np.count_nonzero(must & ~covered)} holes"
    assert radius[covered].max() <= outer + 1.0
    assert radius[covered].min() >= inner - 1.0


def test_shell_voxels_drops_samples_outside_volume():
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=10.0)
    normals = bk.vertex_normals(sphere.vertices, sphere.faces)
    shape = (8, 8, 8)  # the sphere's centre sits at a corner of this small volume
    flat = bk.shell_voxels(sphere.vertices, normals, sphere.faces, 3.0, 1 / 3, shape, np.eye(4))
    assert flat.size > 0
    assert flat.max() < np.prod(shape)
    ijk = np.column_stack(np.unravel_index(flat, shape))
    assert np.all(np.linalg.norm(ijk, axis=1) >= 10.0 - 1.0)


def test_bracket_face_compartments_on_real_head(real_head, template, base_result):
    head, affine = real_head
    verts, faces, labels = template
    face_mask, brackets, n_protected, blend = base_result
    assert face_mask.dtype == np.uint8 and face_mask.shape == head.shape
    counts = np.bincount(face_mask.ravel(), minlength=5)
    assert np.all(counts[1:] > 0), counts
    assert counts.size == 5
    assert np.all(head[face_mask == 1]) and np.all(head[face_mask == 3])
    assert not np.any(head[face_mask == 2]) and not np.any(head[face_mask == 4])
    assert n_protected == 0

    assert [b.name for b in brackets] == [s.name for s in bk.select_labels()]
    for spec, b in zip(bk.FACE_LABELS, brackets, strict=False):
        assert b.n_vertices == labels[b.name].size > 0
        # the inward searches count from the template, the outward ones from the moved surface:
        # the face is pushed out (its median move is the full push), the nose pulled in
        assert -bk.NOSE_PULL_MM <= b.offset_mm <= bk.FACE_OFFSET_MM
        if spec.name == "nose":
            assert b.offset_mm < 0
        elif spec.name != "eyes":  # the eyes lie next to the nose: partly pulled with it
            assert b.offset_mm > 0
        assert bk.label_bounds(b.vertex_dist_in_mm, b.vertex_dist_out_mm, spec) == (
            b.dist_in_mm,
            b.dist_out_mm,
        )
        assert 2.0 <= b.dist_in_mm <= 20.0 + 1.0 and 2.0 <= b.dist_out_mm <= 101.0
        assert b.vertex_dist_in_mm.shape == b.vertex_dist_out_mm.shape == (b.n_vertices,)
    assert [b.n_vertices for b in brackets[4:]] == [0, 0]  # ears: not labelled -> skipped
    json.dumps([b.to_dict() for b in brackets])

    # The mask stays within the bracket depths of the labels (plus the push of the template, one
    # triangle edge for triangles leaving the label and half a voxel diagonal).
    centres = _voxel_centres_mm(head.shape, affine)[face_mask > 0]
    label_verts = verts[np.concatenate(list(labels.values()))]
    reach_mm = max(max(b.dist_in_mm, b.dist_out_mm) for b in brackets) + bk.FACE_OFFSET_MM
    assert cKDTree(label_verts).query(centres)[0].max() <= reach_mm + 4.0

    # the blended per-vertex bounds: convex mixes of the label bounds, no step above the bound
    labelled = [b for b in brackets if b.n_vertices]
    assert min(b.dist_in_mm for b in labelled) - 1e-9 <= blend.dist_in_mm.min()
    assert blend.dist_in_mm.max() <= max(b.dist_in_mm for b in labelled) + 1e-9
    assert blend.dist_out_mm.max() <= max(b.dist_out_mm for b in labelled) + 1e-9
    # smaller than the jumps of FreeSurfer's per-label bounds (the real atlas's bound,
    # bk.MAX_BOUND_STEP_MM, is checked on every real head in test_engine.py)
    jump_out = max(b.dist_out_mm for b in labelled) - min(b.dist_out_mm for b in labelled)
    assert 0 < blend.max_step_out_mm < 0.5 * jump_out
    json.dumps(blend.to_dict())


def test_bracket_face_deterministic(real_head, template, base_result):
    head, affine = real_head
    verts, faces, labels = template
    again, brackets, _, _ = bk.bracket_face(head, affine, verts, faces, labels)
    np.testing.assert_array_equal(again, base_result[0])
    assert [b.dist_in_mm for b in brackets] == [b.dist_in_mm for b in base_result[1]]


def test_bracket_face_xmask_protects_and_counts(real_head, template, base_result):
    head, affine = real_head
    verts, faces, labels = template
    xmask = _voxel_centres_mm(head.shape, affine)[..., 0] < verts[:, 0].mean()
    face_mask, _, n_protected, _ = bk.bracket_face(
        head, affine, verts, faces, labels, xmask=xmask.astype(np.uint8)
    )
    base = base_result[0]
    assert not np.any(face_mask[xmask])
    assert n_protected > 0 and np.count_nonzero((base > 0) & xmask) > 0
    # the inward shell only gets shallower near the exclusion mask (XMASK_ROOM_MM): nothing
    # outside it is added, but for the odd voxel on its border where the shallower sweep's
    # samples (each triangle has its own depths) round differently
    added = (face_mask > 0) & (base == 0)
    assert np.count_nonzero(added) <= 1e-4 * np.count_nonzero(base)
    assert not np.any(added & ~ndi.binary_dilation(base > 0))


def test_bracket_face_keeps_room_to_the_exclusion_mask(real_head, template, base_result):
    """With an exclusion mask 8 mm under the skin, the inward shell stops short of it (by
    about XMASK_ROOM_MM), where without the mask it reaches deeper."""
    head, affine = real_head
    verts, faces, labels = template
    zooms = nib.affines.voxel_sizes(affine)
    depth_mm = ndi.distance_transform_edt(head, sampling=zooms)
    xmask = depth_mm > 8.0
    face_mask, _, _, _ = bk.bracket_face(
        head, affine, verts, faces, labels, xmask=xmask.astype(np.uint8)
    )
    to_xmask_mm = ndi.distance_transform_edt(~xmask, sampling=zooms)
    inner, inner_base = face_mask == 1, base_result[0] == 1
    assert np.count_nonzero(inner_base & (to_xmask_mm < 1.5)) > 100
    assert np.percentile(to_xmask_mm[inner], 1) >= 0.5 * bk.XMASK_ROOM_MM


def test_bracket_face_watermark_raises_inward_shell(real_head, template, base_result):
    head, affine = real_head
    verts, faces, labels = template
    chin = labels["lower-face"]
    seed = verts[chin][np.argmin(np.linalg.norm(verts[chin] - verts[chin].mean(axis=0), axis=1))]
    from_seed_mm = np.linalg.norm(verts[chin] - seed, axis=1)
    mark, core = chin[from_seed_mm < 15.0], chin[from_seed_mm < 8.0]
    assert core.size > 30
    # without the face offset, so that the emboss alone raises the shell
    marked, brackets, _, _ = bk.bracket_face(
        head, affine, verts, faces, labels, watermark=mark, push=False
    )
    base_mask, base_brackets, _, _ = bk.bracket_face(head, affine, verts, faces, labels, push=False)

    normal = bk.vertex_normals(verts, faces)[mark].mean(axis=0)
    centres = _voxel_centres_mm(head.shape, affine).reshape(-1, 3)
    offset_mm = ((centres - seed) @ (normal / np.linalg.norm(normal))).reshape(head.shape)
    near = _near_vertices(verts[core], head.shape, affine, 6.0)
    base = base_mask
    before, after = (near & np.isin(mask, (1, 2)) for mask in (base, marked))
    # The inward shell (1/2) moves out by about the emboss depth, above the template surface.
    rise_mm = np.median(offset_mm[after]) - np.median(offset_mm[before])
    assert 0.6 * bk.WATERMARK_MM < rise_mm < 1.2 * bk.WATERMARK_MM
    above = offset_mm > 1.0
    assert np.count_nonzero(after & above) > 3 * np.count_nonzero(before & above) + 20
    # With unchanged label distances, nothing changes away from the watermark.
    bounds = [(b.dist_in_mm, b.dist_out_mm) for b in brackets]
    assert bounds == [(b.dist_in_mm, b.dist_out_mm) for b in base_brackets]
    far = ~ndi.binary_dilation(_near_vertices(verts[mark], head.shape, affine, 10.0), iterations=5)
    np.testing.assert_array_equal(marked[far], base[far])


def test_bracket_face_honours_label_spec_depth(real_head, template):
    head, affine = real_head
    verts, faces, labels = template
    nose = {"nose": labels["nose"]}
    thin, thin_brackets, _, _ = bk.bracket_face(
        head, affine, verts, faces, nose, label_specs=[bk.LabelSpec("nose")], push=False
    )
    thick, thick_brackets, _, _ = bk.bracket_face(
        head,
        affine,
        verts,
        faces,
        nose,
        label_specs=[bk.LabelSpec("nose", 6.0, 20.0)],
        push=False,
    )
    assert thin_brackets[0].dist_in_mm < 6.0 == thick_brackets[0].dist_in_mm
    assert np.count_nonzero(np.isin(thick, (1, 2))) > 2 * np.count_nonzero(np.isin(thin, (1, 2)))


def test_bracket_face_stops_the_outward_search_at_the_label_cap(real_head, template):
    """A label's ``dist_out_max_mm`` bounds its outward searches, hence its DistOut and the
    outer shell (the lower face's, so that a ray down the neck cannot thicken it)."""
    head, affine = real_head
    verts, faces, labels = template
    nose = {"nose": labels["nose"]}
    step_mm = bk.step_size_mm(affine)
    results = {}
    for cap_mm in (bk.DIST_OUT_MAX_MM, 3.0):
        spec = bk.LabelSpec("nose", dist_out_max_mm=cap_mm)
        results[cap_mm] = bk.bracket_face(
            head, affine, verts, faces, nose, label_specs=[spec], push=False
        )
    (free, free_brackets, _, _), (capped, capped_brackets, _, _) = results.values()
    assert free_brackets[0].dist_out_mm > 3.0 + step_mm
    assert capped_brackets[0].vertex_dist_out_mm.max() <= 3.0 + step_mm
    assert capped_brackets[0].dist_out_mm <= 3.0 + step_mm
    outer = (bk.FACE_MASK_OUT_HEAD, bk.FACE_MASK_OUT_AIR)
    assert np.count_nonzero(np.isin(capped, outer)) < np.count_nonzero(np.isin(free, outer))


def test_bracket_face_ripple_changes_mask(real_head, template, base_result):
    head, affine = real_head
    verts, faces, labels = template
    spec = bk.Ripple(tuple(verts.mean(axis=0)), amp_mm=1.5, period_mm=30.0)
    rippled, _, _, _ = bk.bracket_face(head, affine, verts, faces, labels, ripple_spec=spec)
    base = base_result[0]
    changed = np.count_nonzero(rippled != base)
    assert changed > 0.01 * np.count_nonzero(base)
    assert set(np.unique(rippled)) == {0, 1, 2, 3, 4}


def test_bracket_face_orientation_invariant(real_head, template, base_result):
    head, affine = real_head
    verts, faces, labels = template
    n0 = head.shape[0]

    def reorient(vol):
        return np.flip(np.transpose(vol, (2, 0, 1)), axis=1)

    # new (a, b, c) = old (k, n0 - 1 - i, j)  ->  old (i, j, k) = (n0 - 1 - b, c, a)
    new_to_old = np.array([[0, -1, 0, n0 - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    moved, _, _, _ = bk.bracket_face(reorient(head), affine @ new_to_old, verts, faces, labels)
    expected = reorient(base_result[0])
    both = np.count_nonzero((moved > 0) & (expected > 0))
    dice = 2 * both / (np.count_nonzero(moved) + np.count_nonzero(expected))
    assert dice > 0.99
    # Only rounding ties (samples exactly between two voxels) may resolve differently.
    assert np.count_nonzero(moved != expected) < 1e-3 * np.count_nonzero(expected)


def test_bracket_face_validates_inputs(real_head, template):
    head, affine = real_head
    verts, faces, labels = template
    with pytest.raises(ValueError, match="xmask shape"):
        bk.bracket_face(head, affine, verts, faces, labels, xmask=head[:-1])
    with pytest.raises(ValueError, match="3-D"):
        bk.bracket_face(head[0], affine, verts, faces, labels)
    with pytest.raises(ValueError, match="4x4"):
        bk.bracket_face(head, affine[:3], verts, faces, labels)
    with pytest.raises(ValueError, match="faces"):
        bk.bracket_face(head, affine, verts, faces[:, :2], labels)
    with pytest.raises(ValueError, match="outside"):
        bk.bracket_face(head, affine, verts, faces, {"nose": [len(verts)]})


def test_blend_bounds_smooths_a_step_and_keeps_constants():
    """Two labels side by side on a 1 mm grid: the blend is smooth, monotone across the border,
    a convex mix of the two values, and leaves a constant field unchanged."""
    x, y = np.meshgrid(np.arange(-60.0, 61.0), np.arange(-20.0, 21.0), indexing="ij")
    points = np.stack([x.ravel(), y.ravel(), np.zeros(x.size)], 1)
    values = np.where(points[:, 0] < 0, 2.0, 12.0)
    out = bk.blend_bounds(points, values)
    assert 2.0 - 1e-9 <= out.min() and out.max() <= 12.0 + 1e-9
    row = out.reshape(x.shape)[:, 20]
    assert np.all(np.diff(row) >= -1e-12)
    # Gaussian of width sigma: the steepest slope is 10 / (sigma sqrt(2 pi)) per mm
    assert np.abs(np.diff(row)).max() <= 10.0 / (bk.BLEND_SIGMA_MM * np.sqrt(2 * np.pi)) * 1.05
    assert row[0] == pytest.approx(2.0, abs=1e-6) and row[-1] == pytest.approx(12.0, abs=1e-6)
    np.testing.assert_allclose(bk.blend_bounds(points, np.full(len(points), 5.0)), 5.0)
    both = bk.blend_bounds(points, np.stack([values, 2 * values], 1))
    np.testing.assert_allclose(both[:, 1], 2 * out)
    far = bk.blend_bounds(points, values, query_mm=[[0.0, 500.0, 0.0]])
    assert np.isnan(far).all()


def test_offset_field_tapers_to_the_edge():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=80.0)
    inside = sphere.vertices[:, 1] > 20.0
    field = bk.offset_field(sphere.vertices, inside, sphere.faces, 6.0, 8.0)
    assert np.all(field[~inside] == 0)
    assert field.max() == pytest.approx(6.0)
    edge_dist = cKDTree(sphere.vertices[~inside]).query(sphere.vertices[inside])[0]
    assert np.all(field[inside][edge_dist >= 8.0] == 6.0)
    order = np.argsort(edge_dist)
    assert np.all(np.diff(field[inside][order]) >= 0) and field[inside].min() < 6.0
    # smoothstep's steepest slope is 1.5 offset / taper
    longest_mm = sphere.edges_unique_length.max()
    step_mm = bk.max_edge_step(sphere.faces, np.ones(len(field), bool), field)
    assert 0 < step_mm <= 1.5 * 6.0 / 8.0 * longest_mm


def test_shell_voxels_per_vertex_distances():
    """A constant per-vertex distance sweeps what the scalar does; a varying one sweeps each
    corner to its own depth."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=20.0)
    normals = bk.vertex_normals(sphere.vertices, sphere.faces)
    shape, affine = (64, 64, 64), np.eye(4)
    affine[:3, 3] = -32.0
    args = (sphere.vertices, normals, sphere.faces)
    scalar = bk.shell_voxels(*args, -4.0, 1 / 3, shape, affine)
    per_vertex = bk.shell_voxels(*args, np.full(len(sphere.vertices), -4.0), 1 / 3, shape, affine)
    np.testing.assert_array_equal(scalar, per_vertex)
    varying = np.where(sphere.vertices[:, 2] > 0, -8.0, -2.0)
    ijk = (
        np.argwhere(
            np.isin(
                np.arange(64**3), bk.shell_voxels(*args, varying, 1 / 3, shape, affine)
            ).reshape(shape)
        )
        - 32.0
    )
    r = np.linalg.norm(ijk, axis=1)
    assert r[ijk[:, 2] > 5].min() < 13.5 and r[ijk[:, 2] < -5].min() > 16.5


def test_face_offset_pushes_the_face_and_pulls_the_nose():
    """On a sphere with a 'face' cap and a 'nose' inside it: the face moves out by the full
    push away from its edges, the nose (and the skin within NOSE_MARGIN_MM of it) moves in,
    everything else stays, and the move has no step (smoothsteps: where the pushed and pulled
    regions meet, both slopes add up)."""
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=80.0)
    v = sphere.vertices
    nose = np.flatnonzero(v[:, 1] > 76.0)
    face = np.flatnonzero((v[:, 1] > 20.0) & (v[:, 1] <= 76.0))
    specs = (bk.LabelSpec("face", offset_mm=8.0), bk.LabelSpec("nose", offset_mm=-4.0))
    field = bk.face_offset(v, sphere.faces, specs, (face, nose))
    assert np.all(field[v[:, 1] <= 20.0] == 0)
    assert field[np.argmax(v[:, 1])] == pytest.approx(-4.0)
    assert field.max() == pytest.approx(8.0) and field.min() == pytest.approx(-4.0)
    near_nose = cKDTree(v[nose]).query(v[face])[0] <= bk.NOSE_MARGIN_MM
    assert np.all(field[face[near_nose]] <= 0)
    longest_mm = sphere.edges_unique_length.max()
    steepest = 8.0 / bk.OFFSET_TAPER_MM + 4.0 / bk.NOSE_TAPER_MM
    assert bk.max_edge_step(sphere.faces, np.ones(len(v), bool), field) <= (
        1.5 * steepest * longest_mm + 1e-9
    )


def test_subject_ripple_carries_the_atlas_centre_into_the_subject():
    """The ripple centre given in atlas mm lands where the registration puts that atlas point."""
    from mideface_nipype.engine.atlas import load_atlas

    centre_atlas_mm = load_atlas().meta["ripple"]["center_mm"]
    subject_to_atlas = np.array(
        [[0.0, -1.1, 0.0, 5.0], [1.0, 0.0, 0.1, -20.0], [0.0, 0.0, 0.9, 30.0], [0, 0, 0, 1.0]]
    )
    spec = bk.subject_ripple(centre_atlas_mm, subject_to_atlas, amp_mm=2.0, period_mm=25.0)
    back_mm = subject_to_atlas[:3, :3] @ spec.center_mm + subject_to_atlas[:3, 3]
    assert np.allclose(back_mm, centre_atlas_mm, atol=1e-9)
    assert (spec.amp_mm, spec.period_mm) == (2.0, 25.0)
    assert bk.subject_ripple(centre_atlas_mm, np.eye(4)).center_mm == pytest.approx(
        tuple(centre_atlas_mm)
    )
