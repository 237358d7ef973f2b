"""Reading and resizing input pictures."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DiffusmithError


def load_image(image: Image.Image | str | Path) -> Image.Image:
    """A PIL image in RGB, from a PIL image or a file path (one-line error when it cannot be read)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise DiffusmithError(f"input image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DiffusmithError(f"cannot read input image {path}: {e}; use a PNG, JPEG or WebP file") from None


def resize_and_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale to cover height x width (keeping the aspect ratio), then centre-crop to exactly that size."""
    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))
