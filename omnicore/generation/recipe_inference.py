"""Inference recipes (``inference:`` block): prompts -> PNGs and a grid, or image+question JSONL -> answers."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from ..errors import OmnicoreError
from ..recipe.schema import InferenceSpec
from ..training.checkpoint import atomic_write_text
from .api import answer, generate_images, image_grid


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists():
        p = base / p
    return p


def read_prompts(inputs: dict, base: Path) -> list[str]:
    prompts = list(inputs.get("prompts", []))
    if "prompts_file" in inputs:
        path = _resolve(inputs["prompts_file"], base)
        if not path.is_file():
            raise OmnicoreError(f"inference.inputs.prompts_file: {path}: file not found")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise OmnicoreError("inference.inputs: give 'prompts' (a list) or 'prompts_file' (one prompt per line)")
    return prompts


def read_questions(inputs: dict, base: Path) -> list[dict]:
    records = list(inputs.get("questions", []))
    if "jsonl" in inputs:
        path = _resolve(inputs["jsonl"], base)
        if not path.is_file():
            raise OmnicoreError(f"inference.inputs.jsonl: {path}: file not found")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OmnicoreError(f"{path}:{n}: invalid JSON: {exc.msg}") from None
            if not isinstance(rec, dict) or "question" not in rec:
                raise OmnicoreError(f"{path}:{n}: each line needs a 'question' (and optionally an 'image')")
            if rec.get("image"):
                rec["image"] = str(_resolve(rec["image"], path.parent))
            records.append(rec)
    if not records:
        raise OmnicoreError("inference.inputs: give 'jsonl' (lines of {\"image\": ..., \"question\": ...}) or 'questions'")
    return records


def run_inference(model, spec: InferenceSpec, run_dir: Path, recipe_dir: Path, console: Console) -> Path:
    out = Path(run_dir) / spec.outputs.get("dir", "outputs")
    out.mkdir(parents=True, exist_ok=True)
    sampling = spec.sampling.model_dump(exclude={"guidance_scale"})
    if spec.task == "t2i":
        prompts = read_prompts(spec.inputs, recipe_dir)
        sampling.pop("max_new_tokens")
        images = []
        with Progress(console=console) as progress:
            bar = progress.add_task("generating images", total=len(prompts) * spec.n_per_prompt)
            for start in range(0, len(prompts), spec.batch_size):
                chunk = prompts[start:start + spec.batch_size]
                images += generate_images(model, chunk, n_per_prompt=spec.n_per_prompt,
                                          guidance_scale=spec.sampling.guidance_scale, batch_size=spec.batch_size,
                                          **sampling)
                progress.update(bar, completed=len(images))
        index = []
        for i, im in enumerate(images):
            name = f"{i // spec.n_per_prompt:04d}-{i % spec.n_per_prompt}.png"
            im.save(out / name)
            index.append({"file": name, "prompt": prompts[i // spec.n_per_prompt]})
        image_grid(images).save(out / "grid.png")
        atomic_write_text(out / "index.jsonl", "".join(json.dumps(r) + "\n" for r in index))
        console.print(f"wrote {len(images)} images and grid.png to {out}")
    else:
        records = read_questions(spec.inputs, recipe_dir)
        answers: list[str] = []
        with Progress(console=console) as progress:
            bar = progress.add_task("answering", total=len(records))
            for start in range(0, len(records), spec.batch_size):
                chunk = records[start:start + spec.batch_size]
                answers += answer(model, [r.get("image") for r in chunk], [r["question"] for r in chunk],
                                  batch_size=spec.batch_size, **sampling)
                progress.update(bar, completed=len(answers))
        atomic_write_text(out / "answers.jsonl",
                          "".join(json.dumps({**r, "answer": a}) + "\n" for r, a in zip(records, answers)))
        console.print(f"wrote {len(answers)} answers to {out / 'answers.jsonl'}")
    return out
