"""Inference recipes (``inference:`` block): prompts -> PNGs and a grid, or image+question JSONL -> answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import Progress

from ..errors import OmnicoreError
from ..inputs import MAX_PROMPTS_BYTES, parse_json, read_text
from ..recipe.schema import InferenceInputs, InferenceSpec
from ..training.checkpoint import atomic_write_text
from .api import answer, generate_images, image_grid


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists():
        p = base / p
    return p


def read_prompts(inputs: InferenceInputs, base: Path) -> list[str]:
    prompts = list(inputs.prompts)
    if inputs.prompts_file is not None:
        path = _resolve(inputs.prompts_file, base)
        if not path.exists():
            raise OmnicoreError(f"inference.inputs.prompts_file: {path}: file not found")
        text = read_text(path, "prompts file", MAX_PROMPTS_BYTES)  # a regular UTF-8 file, size-capped
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise OmnicoreError("inference.inputs: give 'prompts' (a list) or 'prompts_file' (one prompt per line)")
    return prompts


def read_questions(inputs: InferenceInputs, base: Path) -> list[dict]:
    records = [{"question": q.question, **({"image": str(_resolve(q.image, base))} if q.image else {})}
               for q in inputs.questions]
    if inputs.jsonl is not None:
        path = _resolve(inputs.jsonl, base)
        if not path.exists():
            raise OmnicoreError(f"inference.inputs.jsonl: {path}: file not found")
        for n, line in enumerate(read_text(path, "questions file", MAX_PROMPTS_BYTES).splitlines(), 1):
            if not line.strip():
                continue
            rec = parse_json(line, str(path), line=n)
            if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
                raise OmnicoreError(f"{path}:{n}: each line needs a 'question' (and optionally an 'image')")
            if rec.get("image"):
                rec["image"] = str(_resolve(rec["image"], path.parent))
            records.append(rec)
    if not records:
        raise OmnicoreError("inference.inputs: give 'jsonl' (lines of {\"image\": ..., \"question\": ...}) or 'questions'")
    return records


def read_inputs(spec: InferenceSpec, base: Path) -> list:
    """The prompts (t2i) or question records (mmu) an inference block names, read and checked."""
    return read_prompts(spec.inputs, base) if spec.task == "t2i" else read_questions(spec.inputs, base)


def _batches(rows: int, batch_size: int, sampling: dict) -> Iterator[tuple[slice, dict]]:
    """The rows of each decode call and its sampling options. A seeded call starts its noise from the seed, so each
    batch (a call of its own, for the progress bar) gets a seed of its own (seed + batch number): with one seed for
    all, a prompt's samples in a later batch would repeat those of an earlier one."""
    for b, start in enumerate(range(0, rows, batch_size)):
        seed = sampling.get("seed")
        yield slice(start, start + batch_size), {**sampling, "seed": None if seed is None else seed + b}


def run_inference(model, spec: InferenceSpec, run_dir: Path, recipe_dir: Path, console: Console) -> Path:
    """t2i: ``NNNN-k.png`` (prompt NNNN, sample k), grid.png and index.jsonl; mmu: answers.jsonl (the question's
    record plus ``answer``, and ``sample`` when ``n_per_prompt`` > 1); all in ``run_dir / outputs.dir``."""
    out = Path(run_dir) / spec.outputs.dir
    out.mkdir(parents=True, exist_ok=True)
    sampling = spec.sampling.model_dump(exclude={"guidance_scale"})
    n = spec.n_per_prompt
    if spec.task == "t2i":
        prompts = read_prompts(spec.inputs, recipe_dir)
        sampling.pop("max_new_tokens")  # a T2I image is always the grid's h*w codes
        rows = [p for p in prompts for _ in range(n)]
        images = []
        with Progress(console=console) as progress:
            bar = progress.add_task("generating images", total=len(rows))
            for rows_slice, s in _batches(len(rows), spec.batch_size, sampling):
                images += generate_images(model, rows[rows_slice], guidance_scale=spec.sampling.guidance_scale,
                                          batch_size=spec.batch_size, **s)
                progress.update(bar, completed=len(images))
        index = []
        for i, im in enumerate(images):
            name = f"{i // n:04d}-{i % n}.png"
            im.save(out / name)
            index.append({"file": name, "prompt": prompts[i // n]})
        image_grid(images).save(out / "grid.png")
        atomic_write_text(out / "index.jsonl", "".join(json.dumps(r) + "\n" for r in index))
        console.print(f"wrote {len(images)} images and grid.png to {out}")
    else:
        records = [{**r, **({"sample": k} if n > 1 else {})} for r in read_questions(spec.inputs, recipe_dir)
                   for k in range(n)]
        answers: list[str] = []
        with Progress(console=console) as progress:
            bar = progress.add_task("answering", total=len(records))
            for rows_slice, s in _batches(len(records), spec.batch_size, sampling):
                chunk = records[rows_slice]
                answers += answer(model, [r.get("image") for r in chunk], [r["question"] for r in chunk],
                                  batch_size=spec.batch_size, **s)
                progress.update(bar, completed=len(answers))
        atomic_write_text(out / "answers.jsonl",
                          "".join(json.dumps({**r, "answer": a}) + "\n" for r, a in zip(records, answers)))
        console.print(f"wrote {len(answers)} answers to {out / 'answers.jsonl'}")
    return out
