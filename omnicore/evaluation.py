"""End-of-run evaluation: held-out MMU exact-match accuracy and T2I correctness scored by the dataset.

T2I scoring is the dataset's business (it knows what its captions promise): a dataset that can score
generated images provides ``score_images(images, samples) -> dict[str, float]``. With ``component_scale`` set
(composable guidance), each T2I sample must carry ``components``, its list of component prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import OmnicoreError
from .generation.api import answer, generate_images, image_grid
from .generation.engine import check_components
from .recipe.schema import EvaluationSpec
from .registry import registry
from .training.checkpoint import atomic_write_text


def _dataset(spec, label):
    try:
        return registry.get("dataset", spec.type).build(**spec.params)
    except OmnicoreError as exc:
        raise type(exc)(f"{label}: {exc}") from None


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def evaluate_mmu(model, dataset, sampling: dict, batch_size: int = 32) -> dict[str, float]:
    images, questions, expected = [], [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        for turn in sample["turns"]:
            images.append(sample.get("image"))
            questions.append(turn["question"])
            expected.append(turn["answer"])
    got = answer(model, images, questions, batch_size=batch_size, **sampling)
    correct = [normalize(g) == normalize(e) for g, e in zip(got, expected)]
    by_question: dict[str, list[bool]] = {}
    for q, ok in zip(questions, correct):
        by_question.setdefault(q, []).append(ok)
    return {"mmu_accuracy": sum(correct) / max(1, len(correct)), "mmu_questions": len(correct),
            "mmu_accuracy_by_question": {q: sum(v) / len(v) for q, v in by_question.items()},
            "mmu_examples": [{"q": q, "expected": e, "got": g} for q, e, g in list(zip(questions, expected, got))[:6]]}


def evaluate_t2i(model, dataset, guidance_scale: float, sampling: dict, out_dir: Path,
                 component_scale: float | None = None, negative_prompts: bool = False) -> dict[str, float]:
    """T2I scores (``t2i_*``). With ``component_scale`` (composable guidance over each sample's ``components``)
    or ``negative_prompts`` (guidance away from each sample's ``negative`` prompt), those give ``t2i_*`` and plain
    guidance, the same samples and seed, ``t2i_plain_*``, so both are on record."""
    if not hasattr(dataset, "score_images"):
        raise OmnicoreError(f"evaluation.t2i: dataset {type(dataset).__name__} cannot score images "
                            f"(it has no score_images method)")
    samples = [dataset[i] for i in range(len(dataset))]
    captions = [s["caption"] for s in samples]
    out_dir.mkdir(parents=True, exist_ok=True)
    compose: dict = {}
    if negative_prompts:
        missing = [i for i, s in enumerate(samples) if not isinstance(s.get("negative"), str)]
        if missing:
            raise OmnicoreError(f"evaluation.negative_prompts: dataset {type(dataset).__name__} gives no "
                                f"'negative' prompt with sample {missing[0]}")
        compose["negative_prompts"] = [s["negative"] for s in samples]
    if component_scale is not None:
        missing = [i for i, s in enumerate(samples) if not s.get("components")]
        if missing:
            raise OmnicoreError(f"evaluation.component_scale: dataset {type(dataset).__name__} gives no "
                                f"'components' with sample {missing[0]} (needed for composable guidance)")
        try:
            check_components([s["components"] for s in samples], len(samples))
        except OmnicoreError as exc:
            raise OmnicoreError(f"evaluation.component_scale: dataset {type(dataset).__name__}: {exc}") from None
        compose.update(components=[s["components"] for s in samples], component_scale=component_scale)
    runs: list[tuple[str, dict]] = [("", compose), ("plain_", {})] if compose else [("", {})]
    results: dict[str, float] = {}
    for prefix, guide in runs:
        images = generate_images(model, captions, guidance_scale=guidance_scale, **guide, **sampling)
        image_grid(images[:32], columns=8).save(out_dir / f"t2i_{prefix}samples.png")
        scores = dataset.score_images(images, samples)
        results.update({f"t2i_{prefix}{k}": v for k, v in scores.items()})
    if component_scale is not None:
        results["t2i_component_scale"] = float(component_scale)
    return {**results, "t2i_images": len(samples)}


def _evaluate(model, spec: EvaluationSpec, out_dir: Path) -> dict:
    results: dict = {}
    sampling = spec.sampling.model_dump(exclude={"guidance_scale"})
    model.eval()
    if spec.mmu is not None:  # exact match of the answer: greedy decoding
        mmu_sampling = {"greedy": True, "max_new_tokens": spec.sampling.max_new_tokens}
        results.update(evaluate_mmu(model, _dataset(spec.mmu, "evaluation.mmu"), mmu_sampling))
    if spec.t2i is not None:
        t2i_sampling = {k: v for k, v in sampling.items() if k != "max_new_tokens"}
        results.update(evaluate_t2i(model, _dataset(spec.t2i, "evaluation.t2i"), spec.guidance_scale, t2i_sampling,
                                    out_dir, spec.component_scale, spec.negative_prompts))
    return results


def run_evaluation(model, spec: EvaluationSpec, run_dir: Path, console: Console, device=None) -> dict:
    """Evaluate ``model``, then each of ``spec.models`` (model directories, relative to ``run_dir``, loaded onto
    ``device``); eval.json holds the model's results and, under each name, that model's. Returns the numbers,
    the further models' prefixed by their names."""
    from .model.unified import load

    run_dir = Path(run_dir)
    results = _evaluate(model, spec, run_dir / "eval")
    others: dict[str, dict] = {}
    for name, path in spec.models.items():
        directory = run_dir / path
        try:
            other = load(directory, device=device)
        except OmnicoreError as exc:
            raise OmnicoreError(f"evaluation.models.{name}: {exc}") from None
        others[name] = _evaluate(other, spec, run_dir / "eval" / name)
    atomic_write_text(run_dir / "eval.json", json.dumps({**results, **others}, indent=2))
    columns = {"model": results, **others}
    table = Table(title="evaluation (held out)")
    table.add_column("metric")
    for column in columns:
        table.add_column(column)
    for k, v in results.items():
        if isinstance(v, (int, float)):
            cells = [columns[c].get(k) for c in columns]
            table.add_row(k, *("" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x) for x in cells))
    console.print(table)
    numbers = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    for name, other in others.items():
        numbers.update({f"{name}_{k}": v for k, v in other.items() if isinstance(v, (int, float))})
    return numbers
