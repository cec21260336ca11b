"""T2I data: ``t2i_jsonl`` (caption + pre-tokenised VQ codes, one JSON object a line), ``image_caption_folder``
(images with captions, for on-the-fly tokenisation or ``omni pretokenize``) and ``write_t2i_jsonl``.

JSONL line: ``{"caption": str, "codes": [int, ...]}``, optionally ``"image": path`` (relative to
``image_folder``, default the JSONL file's folder); a line needs codes or an image. Every line is checked when
the dataset is built; errors name the file and line number. Codes are kept as one int32 array, not Python
lists (COCO's 83k x 256 codes take 85 MB), and handed out as ``list[int]``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from torch.utils.data import Dataset

from omnicore.inputs import MAX_CAPTION_BYTES

from ._common import (IMAGE_EXTENSIONS, DatasetError, open_rgb, parse_data_json, read_data_text, read_lines,
                      require_dir, require_file)

CAPTIONS_JSONL = "captions.jsonl"


def _codes_array(codes: Any, where: str, num_codes: int | None = None,
                 codebook_size: int | None = None) -> np.ndarray:
    if hasattr(codes, "detach"):  # torch tensor
        codes = codes.detach().cpu().numpy()
    if isinstance(codes, np.ndarray):
        arr = codes.reshape(-1)
    else:
        if not isinstance(codes, (list, tuple)) or not codes:
            raise DatasetError(f"{where}: 'codes' must be a non-empty list of integers")
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in codes):
            bad = next(c for c in codes if isinstance(c, bool) or not isinstance(c, (int, np.integer)))
            raise DatasetError(f"{where}: 'codes' must hold integers, found {bad!r}")
        arr = np.asarray(codes)
    if arr.size == 0 or arr.dtype.kind not in "iu":
        raise DatasetError(f"{where}: 'codes' must be a non-empty list of integers")
    if arr.min() < 0 or arr.max() > np.iinfo(np.int32).max:
        raise DatasetError(f"{where}: codes must be non-negative 32-bit integers (found {int(arr.min())})")
    if num_codes is not None and arr.size != num_codes:
        raise DatasetError(f"{where}: {arr.size} codes, expected {num_codes}")
    if codebook_size is not None and arr.max() >= codebook_size:
        raise DatasetError(f"{where}: code {int(arr.max())} is outside the codebook (size {codebook_size})")
    return arr.astype(np.int32)


class T2IJsonl(Dataset):
    """Pre-tokenised T2I data: JSONL lines of caption + VQ codes (optionally an image path)."""

    def __init__(self, path: str, image_folder: str | None = None, num_codes: int | None = None,
                 codebook_size: int | None = None) -> None:
        self.path = require_file(path, "t2i_jsonl: file")
        self.image_folder = (require_dir(image_folder, "t2i_jsonl: image_folder") if image_folder is not None
                             else self.path.parent)
        self.captions: list[str] = []
        self.images: list[str | None] = []
        self.lines: list[int] = []
        codes: list[np.ndarray | None] = []
        for n, line in read_lines(self.path, "t2i_jsonl file"):
            if not line.strip():
                continue
            where = f"{self.path}:{n}"
            record = parse_data_json(line, self.path, n)
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
            caption = record.get("caption")
            if not isinstance(caption, str):
                raise DatasetError(f"{where}: 'caption' must be a string"
                                   + ("" if "caption" in record else " (missing)"))
            image = record.get("image")
            if image is not None and not isinstance(image, str):
                raise DatasetError(f"{where}: 'image' must be a path string")
            c = record.get("codes")
            if c is None and image is None:
                raise DatasetError(f"{where}: the line has neither 'codes' nor 'image'")
            codes.append(None if c is None else _codes_array(c, where, num_codes, codebook_size))
            self.captions.append(caption)
            self.images.append(image)
            self.lines.append(n)
        lengths = {len(c) for c in codes if c is not None}  # ragged lengths are allowed: the collator checks
        if codes and all(c is not None for c in codes) and len(lengths) == 1:
            self._codes: np.ndarray | list = np.stack(codes)
        else:
            self._codes = codes

    def __len__(self) -> int:
        return len(self.captions)

    def codes(self, index: int) -> list[int] | None:
        c = self._codes[index]
        return None if c is None else c.tolist()

    def __getitem__(self, index: int) -> dict:
        name = self.images[index]
        path = None if name is None else self.image_folder / name
        image = None if path is None else open_rgb(path, f"{self.path}:{self.lines[index]}")
        return {"task": "t2i", "caption": self.captions[index], "image": image, "codes": self.codes(index),
                "meta": {"index": index, "line": self.lines[index], "source": str(self.path),
                         "image_path": None if path is None else str(path)}}


def write_t2i_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write T2I records (``caption``, ``codes`` as list / array / tensor, optional ``image``) as JSONL, atomically.

    The lines go to a temporary file beside ``path`` that replaces it only once complete; a bad record
    raises DatasetError naming its index and leaves ``path`` untouched. Returns the number of lines.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, record in enumerate(records):
                where = f"write_t2i_jsonl({str(path)!r}): record {i}"
                if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
                    raise DatasetError(f"{where}: needs a string 'caption'")
                line: dict[str, Any] = {"caption": record["caption"]}
                if record.get("codes") is not None:
                    line["codes"] = _codes_array(record["codes"], where).tolist()
                if record.get("image") is not None:
                    line["image"] = str(record["image"])
                if "codes" not in line and "image" not in line:
                    raise DatasetError(f"{where}: needs 'codes' or 'image'")
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return count


class ImageCaptionFolder(Dataset):
    """A folder of images with same-stem .txt captions (or a captions.jsonl) as T2I samples with images."""

    def __init__(self, folder: str, recursive: bool = False) -> None:
        self.folder = require_dir(folder, "image_caption_folder: folder")
        index = self.folder / CAPTIONS_JSONL
        if index.exists():  # not is_file(): a captions.jsonl that cannot be read is an error, not ignored
            self.items = self._from_jsonl(index)
        else:
            self.items = self._from_txt(recursive)
        if not self.items:
            raise DatasetError(f"image_caption_folder: no images with captions in {str(self.folder)!r} "
                               f"(expected image files with same-stem .txt captions, or a {CAPTIONS_JSONL})")

    def _from_jsonl(self, index: Path) -> list[tuple[Path, str]]:
        items = []
        for n, line in read_lines(index, "captions file"):
            if not line.strip():
                continue
            where = f"{index}:{n}"
            record = parse_data_json(line, index, n)
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: expected a JSON object")
            name = record.get("image", record.get("file_name"))
            caption = record.get("caption", record.get("text"))
            if not isinstance(name, str) or not isinstance(caption, str):
                raise DatasetError(f"{where}: needs string 'image' (or 'file_name') and 'caption' (or 'text')")
            items.append((require_file(self.folder / name, f"{where}: image"), caption.strip()))
        return items

    def _from_txt(self, recursive: bool) -> list[tuple[Path, str]]:
        pattern = "**/*" if recursive else "*"
        images = sorted(p for p in self.folder.glob(pattern)
                        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        items = []
        for p in images:
            txt = p.with_suffix(".txt")
            if not txt.exists():
                raise DatasetError(f"image_caption_folder: image {str(p)!r} has no caption file {txt.name!r}")
            items.append((p, read_data_text(txt, "caption file", MAX_CAPTION_BYTES).strip()))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, caption = self.items[index]
        return {"task": "t2i", "caption": caption, "image": open_rgb(path), "codes": None,
                "meta": {"index": index, "image_path": str(path), "name": path.name}}


def build_t2i_jsonl(path: str, image_folder: str | None = None, num_codes: int | None = None,
                    codebook_size: int | None = None) -> T2IJsonl:
    """Pre-tokenised T2I JSONL (caption + VQ codes per line, optional image path)."""
    return T2IJsonl(path, image_folder, num_codes, codebook_size)


def build_image_caption_folder(folder: str, recursive: bool = False) -> ImageCaptionFolder:
    """A folder of images with same-stem .txt captions (or captions.jsonl) as T2I samples."""
    return ImageCaptionFolder(folder, recursive)
