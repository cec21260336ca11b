"""Reading files a user names: recipes, model configs, prompts, data files and images.

Every reader here checks that the path is a regular file before reading (a FIFO would block, a device never
end), caps what it reads, decodes text as strict UTF-8, and bounds the work a crafted file can ask for: JSON
nesting and image dimensions are checked before anything is built from them. Failures raise InputFileError
with a one-line message that starts with the path.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
import sys
import warnings
from typing import Any, BinaryIO, Iterator

from .errors import InputFileError

MiB = 1 << 20
# Recipes and model configs are a few KB; these caps only stop a wrong file (a dataset, a disk image) early.
MAX_RECIPE_BYTES = 1 * MiB
MAX_CONFIG_BYTES = 16 * MiB
MAX_PROMPTS_BYTES = 16 * MiB
MAX_CAPTION_BYTES = 1 * MiB
# One line of a JSONL data file: a 1024x1024 image's codes take well under 1 MiB.
MAX_JSONL_LINE_BYTES = 64 * MiB
# 64 Mi pixels (8192 x 8192). PIL's own guard warns only from 89 M pixels and refuses from 179 M, so whatever it
# flags is over this cap too.
MAX_IMAGE_PIXELS = 64 * MiB
# Formats PIL may try on an input image: what the dataset plugins list, nothing exotic (JPEG covers MPO).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")

_UTF16_32_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                  (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (the CLI prints errors as one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def special_file_kind(path: str | os.PathLike) -> str | None:
    """What an existing ``path`` is when it is not a regular file ("a directory", "a named pipe (FIFO)", ...);
    ``None`` for a regular file or a path that cannot be stat'ed (the reader then says why)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _file_kind(mode)


def regular_file(path: str | os.PathLike, what: str) -> os.stat_result:
    """``os.stat`` of ``path``, which must be a regular file (symlinks followed); checked without opening it."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise InputFileError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(f"{path}: {what} is {_file_kind(st.st_mode)}, not a regular file")
    return st


def open_regular(path: str | os.PathLike, what: str) -> BinaryIO:
    """Open a regular file for binary reading. Non-blocking open, then the type is checked again on the open
    descriptor: a FIFO swapped in after the first check still cannot block the reader."""
    regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InputFileError(f"{path}: {what} is {_file_kind(mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def read_bytes(path: str | os.PathLike, what: str, max_bytes: int | None) -> bytes:
    """The whole file, refused when larger than ``max_bytes`` (``None``: no cap)."""
    st = regular_file(path, what)
    if max_bytes is not None and st.st_size > max_bytes:
        raise InputFileError(f"{path}: {what} is {_size(st.st_size)}, over the {_size(max_bytes)} limit")
    with open_regular(path, what) as f:
        try:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as exc:
            raise InputFileError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if max_bytes is not None and len(data) > max_bytes:  # it grew after the stat
        raise InputFileError(f"{path}: {what} is over the {_size(max_bytes)} limit")
    return data


def decode_text(data: bytes, where: str, what: str) -> str:
    """Strict UTF-8 (a leading BOM is dropped); other encodings and binary data get a message saying which."""
    for bom, name in _UTF16_32_BOMS:
        if data.startswith(bom):
            raise InputFileError(f"{where}: {what} is {name} text; save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise InputFileError(f"{where}: {what} is binary, not text (a NUL byte on line {line})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputFileError(f"{where}: {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                             f"save it as UTF-8") from None


def read_text(path: str | os.PathLike, what: str, max_bytes: int | None) -> str:
    """A UTF-8 text file, whole, at most ``max_bytes``."""
    return decode_text(read_bytes(path, what, max_bytes), str(path), what)


def iter_lines(path: str | os.PathLike, what: str, max_line_bytes: int = MAX_JSONL_LINE_BYTES,
               ) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file, read one line at a time (data files can be large)."""
    with open_regular(path, what) as f:
        n = 0
        while True:
            try:
                raw = f.readline(max_line_bytes + 1)
            except OSError as exc:
                raise InputFileError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
            if not raw:
                return
            n += 1
            if len(raw) > max_line_bytes:
                raise InputFileError(f"{path}:{n}: line longer than {_size(max_line_bytes)}")
            if n == 1:
                for bom, name in _UTF16_32_BOMS:
                    if raw.startswith(bom):
                        raise InputFileError(f"{path}: {what} is {name} text; save it as UTF-8")
            if b"\x00" in raw:
                raise InputFileError(f"{path}:{n}: {what} is binary, not text (a NUL byte)")
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise InputFileError(f"{path}:{n}: {what} is not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                                     f"save it as UTF-8") from None
            yield n, text


def _depth(value: Any, limit: int) -> bool:
    """Whether nested lists/dicts stay within ``limit`` levels (iterative: the data may be deeper than the stack)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            if d > limit:
                return False
            stack.extend((c, d + 1) for c in v)
    return True


def _too_long_integer(exc: ValueError) -> bool:
    return "integer string conversion" in str(exc)


def parse_json(text: str, where: str, max_depth: int | None = None, line: int | None = None) -> Any:
    """``json.loads`` whose failures (syntax, nesting deeper than the parser's stack, oversized integers) are
    one-line InputFileErrors; ``max_depth`` also bounds the nesting of what parsed. ``line``: the text is that
    line of the file ``where`` (JSONL)."""
    at = where if line is None else f"{where}:{line}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"{where}:{line if line is not None else exc.lineno}"
        raise InputFileError(f"{at}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise InputFileError(f"{at}: JSON nested too deeply") from None
    except ValueError as exc:
        if _too_long_integer(exc):
            raise InputFileError(f"{at}: invalid JSON: an integer longer than {sys.get_int_max_str_digits()} "
                                 f"digits") from None
        raise InputFileError(f"{at}: invalid JSON: {first_line(exc)}") from None
    if max_depth is not None and not _depth(value, max_depth):
        raise InputFileError(f"{at}: JSON nested more than {max_depth} levels deep")
    return value


def open_image(path: str | os.PathLike, what: str = "image file", max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode an image file into an RGB PIL image (transparency composited over white), file closed.

    The dimensions are read from the header and checked against ``max_pixels`` before any pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    with open_regular(path, what) as f:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(f, formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            raise InputFileError(f"{path}: not an image file ({', '.join(IMAGE_FORMATS)})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputFileError(f"{path}: image has more than {max_pixels:,} pixels; not decoding it") from None
        except Exception as exc:  # a header PIL recognised but could not parse
            raise InputFileError(f"{path}: cannot read image: {first_line(exc)}") from None
        with im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise InputFileError(f"{path}: image has no pixels ({w}x{h})")
            if w * h > max_pixels:
                raise InputFileError(f"{path}: image is {w}x{h} pixels, more than {max_pixels:,}; not decoding it")
            try:
                im.load()
                if im.mode == "RGB":
                    return im.copy()
                if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")  # composite transparency over white, not black
                    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    return Image.alpha_composite(background, rgba).convert("RGB")
                return im.convert("RGB")
            except Exception as exc:  # PIL's decoders raise many types on malformed data (OSError, SyntaxError, ...)
                raise InputFileError(f"{path}: cannot decode image: {first_line(exc)}") from None
