"""QA pictures: ``save_png`` writes exactly the pixels it is given and refuses what it would
have to guess at (a float picture of 0.7 once came out all black)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import HEADS_DIR, default_run
from PIL import Image

from mideface_nipype.reports.slices import label_slices, save_png
from mideface_nipype.utils import io

HEAD = HEADS_DIR / "IXI012-HH-1211-T1_ds.nii.gz"


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """The segmentation picture's layout on a real head (labels: a crude intensity split)."""
    img = nib.load(HEAD)
    data = io.first_frame(img)
    labels = np.digitize(data, np.percentile(data[data > 0], [30, 60, 90])).astype(np.uint8)
    return label_slices(data, labels, img.affine)


def test_rgb_and_grey_pictures_come_back_pixel_for_pixel(picture, tmp_path):
    assert picture.dtype == np.uint8 and picture.ndim == 3
    rgb = Image.open(save_png(picture, tmp_path / "rgb.png"))
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), picture)
    grey = picture[..., 0].astype(np.int64)  # any integer type with values 0-255
    back = np.asarray(Image.open(save_png(grey, tmp_path / "grey.png")))
    assert back.shape == picture.shape and all(np.array_equal(back[..., c], grey) for c in range(3))


@pytest.mark.parametrize(
    ("image", "error", "says"),
    [
        (np.full((8, 8, 3), 0.7), TypeError, "float64"),
        (np.full((8, 8), 300, dtype=np.int32), ValueError, "0-255"),
        (np.full((8, 8), -1, dtype=np.int16), ValueError, "0-255"),
        (np.zeros((8, 8, 4), dtype=np.uint8), ValueError, r"\(8, 8, 4\)"),
    ],
    ids=["float", "above-255", "negative", "rgba"],
)
def test_pictures_it_would_have_to_guess_at_are_refused(image, error, says, tmp_path):
    path = tmp_path / "bad.png"
    with pytest.raises(error, match=says) as caught:
        save_png(image, path)
    assert str(path) in str(caught.value) and not path.exists()


@pytest.mark.slow
def test_segmentation_picture_shows_the_defaced_head_only():
    """``segmentation.png`` (published beside the defaced images) was drawn on the original
    slices, the soft-tissue border along the true profile: nose, lips, chin. It is now the
    defaced image with no label inside the face mask."""
    run = default_run(HEAD.name)
    labels = np.asarray(nib.load(run / "seg.nii.gz").dataobj)
    face = np.asarray(nib.load(run / "face.mask.nii.gz").dataobj) > 0
    defaced, original = io.load_volume(run / "defaced.nii.gz"), nib.load(HEAD)
    shown = np.asarray(Image.open(run / "segmentation.png"))

    def drawn(data: np.ndarray, labels: np.ndarray) -> np.ndarray:
        picture = label_slices(data, labels, defaced.affine)
        zoom = shown.shape[0] // picture.shape[0]
        return np.repeat(np.repeat(picture, zoom, axis=0), zoom, axis=1)

    assert np.array_equal(shown, drawn(io.first_frame(defaced), np.where(face, 0, labels)))
    assert not np.array_equal(shown, drawn(io.first_frame(original), labels))
