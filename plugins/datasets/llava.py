"""``llava_json``: LLaVA-style conversation files as MMU samples.

A JSON list of records (or a ``.jsonl`` file with one record a line)::

    {"id": "0001", "image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}

``image`` is optional (text-only records give ``image: None``) and relative to ``image_folder`` (default: the
JSON file's folder). Conversations must alternate human, gpt, human, gpt ... and end with gpt; the check
runs over every record when the dataset is built, and its error names the file and record index. Images are
opened only when a sample is read, converted to RGB.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ._common import DatasetError, open_rgb, parse_data_json, read_data_text, read_lines, require_dir, require_file

IMAGE_TOKEN = "<image>"
HUMAN = {"human", "user"}
GPT = {"gpt", "assistant"}


def strip_image_token(text: str) -> str:
    """Remove ``<image>`` placeholders and the whitespace they leave at either end."""
    return text.replace(IMAGE_TOKEN, "").strip()


def _parse_turns(conversations, where: str) -> list[dict[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise DatasetError(f"{where}: 'conversations' must be a non-empty list")
    turns: list[dict[str, str]] = []
    for j, message in enumerate(conversations):
        if not isinstance(message, dict) or "from" not in message or "value" not in message:
            raise DatasetError(f"{where}: conversations[{j}] must be an object with 'from' and 'value'")
        speaker, value = str(message["from"]).lower(), message["value"]
        if not isinstance(value, str):
            raise DatasetError(f"{where}: conversations[{j}].value must be a string, got {type(value).__name__}")
        expected = HUMAN if j % 2 == 0 else GPT
        if speaker not in expected:
            want = "human" if j % 2 == 0 else "gpt"
            raise DatasetError(f"{where}: conversations[{j}] is from {message['from']!r}, expected {want!r} "
                               f"(turns must alternate human, gpt)")
        if j % 2 == 0:
            turns.append({"question": strip_image_token(value), "answer": ""})
        else:
            turns[-1]["answer"] = value.strip()
    if len(conversations) % 2:
        raise DatasetError(f"{where}: the last message is from 'human' with no 'gpt' answer")
    return turns


class LlavaJson(Dataset):
    """LLaVA-style conversation JSON (human/gpt turns, optional image) as MMU samples."""

    def __init__(self, json_path: str, image_folder: str | None = None, check_images: bool = False) -> None:
        self.json_path = require_file(json_path, "llava_json: conversation file")
        self.image_folder = (require_dir(image_folder, "llava_json: image_folder") if image_folder is not None
                             else self.json_path.parent)
        records = self._load()
        self.ids: list[str | None] = []
        self.images: list[str | None] = []
        self.turns: list[list[dict[str, str]]] = []
        for i, record in enumerate(records):
            where = f"{self.json_path}: record {i}"
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: expected an object, got {type(record).__name__}")
            if "id" in record:
                where += f" (id {record['id']!r})"
            image = record.get("image")
            if image is not None and not isinstance(image, str):
                raise DatasetError(f"{where}: 'image' must be one relative path (a string), got "
                                   f"{type(image).__name__}")
            if "conversations" not in record:
                raise DatasetError(f"{where}: missing 'conversations'")
            self.turns.append(_parse_turns(record["conversations"], where))
            self.ids.append(None if record.get("id") is None else str(record["id"]))
            self.images.append(image or None)
            if check_images and image:
                require_file(self.image_folder / image, f"{where}: image")

    def _load(self) -> list:
        path = self.json_path
        if path.suffix.lower() == ".jsonl":
            return [parse_data_json(line, path, n) for n, line in read_lines(path, "conversation file")
                    if line.strip()]
        records = parse_data_json(read_data_text(path, "conversation file"), path)
        if not isinstance(records, list):
            raise DatasetError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        return records

    def __len__(self) -> int:
        return len(self.turns)

    def image_path(self, index: int) -> Path | None:
        name = self.images[index]
        return None if name is None else self.image_folder / name

    def __getitem__(self, index: int) -> dict:
        path = self.image_path(index)
        where = f"{self.json_path}: record {index}"
        image = None if path is None else open_rgb(path, where)
        return {"task": "mmu", "image": image, "turns": [dict(t) for t in self.turns[index]],
                "meta": {"id": self.ids[index], "index": index, "image_path": None if path is None else str(path),
                         "source": str(self.json_path)}}


def build_llava_json(json_path: str, image_folder: str | None = None, check_images: bool = False) -> LlavaJson:
    """LLaVA-style conversation JSON/JSONL (human/gpt turns, optional image) as MMU samples."""
    return LlavaJson(json_path, image_folder, check_images)
