"""Shared helpers for the dataset plugins: errors with one-line messages, lazy RGB image opening."""

from __future__ import annotations

from pathlib import Path

from omnicore.errors import InputFileError, OmnicoreError
from omnicore.inputs import iter_lines, open_image, parse_json, read_text, special_file_kind

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DatasetError(OmnicoreError, ValueError):
    """A data file is malformed; the message names the file and the record or line at fault."""


class DatasetFileNotFoundError(OmnicoreError, FileNotFoundError):
    """A data file or image named by a dataset does not exist; the message names the path."""

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror) pairs
        return str(self.args[0]) if self.args else ""


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a regular file: missing is a (FileNotFound) error, so is a folder, FIFO or device, which
    would fail or block when read."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetFileNotFoundError(f"{what} {str(p)!r} does not exist")
    kind = special_file_kind(p)
    if kind is not None:
        raise DatasetError(f"{what} {str(p)!r} is {kind}, not a regular file")
    return p


def require_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        if not p.exists():
            raise DatasetFileNotFoundError(f"{what} {str(p)!r} does not exist")
        raise DatasetFileNotFoundError(f"{what} {str(p)!r} is {special_file_kind(p) or 'a file'}, not a folder")
    return p


def read_lines(path: Path, what: str):
    """``(line number, text)`` of a UTF-8 data file, one line at a time; unreadable bytes are a DatasetError."""
    try:
        yield from iter_lines(path, what)
    except InputFileError as exc:
        raise DatasetError(str(exc)) from None


def read_data_text(path: Path, what: str, max_bytes: int | None = None) -> str:
    """A whole UTF-8 data file (a JSON list, a caption); unreadable bytes are a DatasetError."""
    try:
        return read_text(path, what, max_bytes)
    except InputFileError as exc:
        raise DatasetError(str(exc)) from None


def parse_data_json(text: str, path: Path, line: int | None = None):
    """JSON of a whole data file, or of its line ``line`` (JSONL); malformed JSON is a DatasetError."""
    try:
        return parse_json(text, str(path), line=line)
    except InputFileError as exc:
        raise DatasetError(str(exc)) from None


def open_rgb(path: str | Path, context: str = ""):
    """Open an image file fully (no file handle left open) and convert it to RGB; transparency is composited
    over white. Dimensions over omnicore.inputs.MAX_IMAGE_PIXELS are refused before decoding."""
    where = f" ({context})" if context else ""
    p = Path(path)
    if not p.exists():
        raise DatasetFileNotFoundError(f"image file {str(p)!r} does not exist{where}")
    try:
        return open_image(p)
    except InputFileError as exc:
        detail = str(exc).removeprefix(f"{p}: ")
        raise DatasetError(f"image file {str(p)!r} cannot be read{where}: {detail}") from None
