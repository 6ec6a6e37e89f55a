"""8-bit RGB from the image files PIL opens, without losing their contrast.

``Image.convert("RGB")``, what torchvision's and timm's folder datasets do, clips a 16-bit grayscale
PNG (mode ``I;16``, common in microscopy, medical and depth imaging) at 255: nearly every pixel of
such an image becomes white, and a model fine-tuned on them learns from blank pictures without any
error. Here 16-bit values are scaled to 8 bits instead (65535 -> 255). Images of signed or 32-bit
integers (mode ``I`` from a format other than PNG or PGM) or floats (``F``, from TIFF) carry no value range that a
decoder could rely on (0-1, 0-255, counts), so they are refused with a hint rather than guessed.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


# Formats whose mode "I" holds 16-bit values: older Pillow opens a 16-bit gray PNG as "I" (PNG has no
# deeper gray), and a PGM with a maxval above 255 opens as "I" scaled to 0..65535.
_SIXTEEN_BIT_AS_I = frozenset({"PNG", "PPM"})


def _is_sixteen_bit(image: Image.Image) -> bool:
    return image.mode in _SIXTEEN_BIT or (image.mode == "I" and image.format in _SIXTEEN_BIT_AS_I)


def unsupported_mode(image: Image.Image) -> str | None:
    """Why ``image`` (opened, not necessarily loaded) cannot become 8-bit RGB faithfully; None if it can."""
    if image.mode == "F" or (image.mode == "I" and not _is_sixteen_bit(image)):
        kind = "floats" if image.mode == "F" else "signed or 32-bit integers"
        return (f"its pixels are {kind} (PIL mode {image.mode!r}), which have no defined value range to map to "
                "8 bits. Convert such images to 8- or 16-bit PNG with the scaling that suits your data.")
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, 16-bit gray scaled rather than clipped; ``ValueError`` for float/int32 images."""
    problem = unsupported_mode(image)
    if problem:
        raise ValueError(problem)
    if _is_sixteen_bit(image):
        values = np.asarray(image).astype(np.float32)
        eight = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight).convert("RGB")
    return image.convert("RGB")
