"""Shared helpers for the dataset plugins: errors with one-line messages, lazy RGB image opening."""

from __future__ import annotations

from pathlib import Path

from omnicore.errors import OmnicoreError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DatasetError(OmnicoreError, ValueError):
    """A data file is malformed; the message names the file and the record or line at fault."""


class DatasetFileNotFoundError(OmnicoreError, FileNotFoundError):
    """A data file or image named by a dataset does not exist; the message names the path."""

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror) pairs
        return str(self.args[0]) if self.args else ""


def require_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        state = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise DatasetFileNotFoundError(f"{what} {str(p)!r} {state}")
    return p


def require_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        state = "is a file, not a folder" if p.exists() else "does not exist"
        raise DatasetFileNotFoundError(f"{what} {str(p)!r} {state}")
    return p


def open_rgb(path: str | Path, context: str = ""):
    """Open an image file fully (no file handle left open) and convert it to RGB."""
    from PIL import Image, UnidentifiedImageError

    where = f" ({context})" if context else ""
    p = Path(path)
    if not p.is_file():
        raise DatasetFileNotFoundError(f"image file {str(p)!r} does not exist{where}")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode == "RGB":
                return im.copy()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")  # composite transparency over white, not black
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"image file {str(p)!r} cannot be read{where}: {exc}") from None
