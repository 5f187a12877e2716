"""QA pictures without a display: PNG files (Pillow) and labelled slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) RGB or (H, W) grey picture of integers 0-255 as an 8-bit RGB PNG.

    Anything else is refused rather than guessed at: a float picture (0-1 or 0-255?) would be
    cast and come out black or wrapped.
    """
    from PIL import Image

    img = np.asarray(image)
    if not np.issubdtype(img.dtype, np.integer):
        raise TypeError(f"save_png needs integers 0-255 (uint8), got {img.dtype} for {path}")
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"save_png needs an (H, W) or (H, W, 3) array, got {img.shape} for {path}")
    if img.size and (img.min() < 0 or img.max() > 255):
        raise ValueError(f"save_png needs values 0-255, got {img.min()} to {img.max()} for {path}")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    path = Path(path)
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(path, format="PNG")
    return path


#: Outline colours of segmentation labels 0-6 (air, soft, bone, csf, gm, wm, eyes).
LABEL_COLOURS = np.array(
    [
        [0, 0, 0],
        [230, 160, 90],
        [250, 250, 250],
        [60, 120, 255],
        [120, 220, 120],
        [250, 220, 60],
        [255, 40, 40],
    ],
    dtype=np.uint8,
)
#: Names of segmentation labels 0-6 (``segment.SEG_LABELS``), for the legend.
LABEL_NAMES = ("air", "soft tissue", "bone", "CSF", "grey matter", "white matter", "eyes")
#: Height of one legend row (pixels).
LEGEND_ROW_PX = 14


def legend_strip(names: tuple[str, ...], colours: np.ndarray, width: int) -> np.ndarray:
    """An (H, width, 3) strip that names each colour: a swatch, then the name, rows wrapped at
    ``width``, so a picture explains its own outlines wherever it is shown."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x, y, places = 0, 0, []
    for name in names:
        item_px = LEGEND_ROW_PX + int(np.ceil(measure.textlength(name, font=font))) + 10
        if x and x + item_px > width:
            x, y = 0, y + LEGEND_ROW_PX
        places.append((x, y))
        x += item_px
    strip = Image.new("RGB", (width, y + LEGEND_ROW_PX))
    draw = ImageDraw.Draw(strip)
    for (x, y), name, colour in zip(places, names, colours, strict=True):
        draw.rectangle([x + 1, y + 2, x + 10, y + 11], fill=tuple(int(c) for c in colour))
        draw.text((x + LEGEND_ROW_PX, y), name, fill=(255, 255, 255), font=font)
    return np.asarray(strip)


def label_slices(data: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Sagittal, coronal and axial slices through the head centre, label borders drawn in colour,
    with a legend of the labels below.

    Arrays are reoriented to RAS through the affine first, so every subject is shown alike.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    img = nib.orientations.apply_orientation(np.asarray(data, dtype=np.float32), ornt)
    lab = nib.orientations.apply_orientation(np.asarray(labels), ornt)
    centre = np.round(np.argwhere(lab > 0).mean(0)).astype(int)
    hi = np.percentile(img[lab > 0], 99) if (lab > 0).any() else img.max()
    panels = []
    for axis in range(3):
        # views (np.take copies the whole reoriented volume first: 0.26 s for a 1 mm head)
        grey = np.clip(np.moveaxis(img, axis, 0)[centre[axis]] / max(hi, 1e-6), 0, 1) * 255
        sl = np.moveaxis(lab, axis, 0)[centre[axis]]
        rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
        border = np.zeros(sl.shape, dtype=bool)
        border[1:, :] |= sl[1:, :] != sl[:-1, :]
        border[:, 1:] |= sl[:, 1:] != sl[:, :-1]
        rgb[border] = LABEL_COLOURS[np.clip(sl[border], 0, len(LABEL_COLOURS) - 1)]
        panels.append(np.transpose(rgb, (1, 0, 2))[::-1])  # rows = superior first
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    slices = np.concatenate(padded, axis=1)
    legend = legend_strip(LABEL_NAMES[1:], LABEL_COLOURS[1:], slices.shape[1])
    return np.concatenate([slices, legend], axis=0)
