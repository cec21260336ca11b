"""An example omnicore plugin: registers the `solid_colors` dataset and an `omni solid-colors` command."""

from __future__ import annotations

import random

from PIL import Image

from omnicore import hookimpl

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}


class SolidColors:
    """Images filled with one colour, with a question about it (MMU) or a caption (T2I)."""

    def __init__(self, task: str = "mmu", size: int = 64, image_size: int = 32, seed: int = 0):
        if task not in ("mmu", "t2i"):
            raise ValueError(f"solid_colors: task must be 'mmu' or 't2i', got {task!r}")
        self.task, self.size, self.image_size, self.seed = task, size, image_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        color = random.Random(self.seed * 1_000_003 + i).choice(sorted(COLORS))
        image = Image.new("RGB", (self.image_size, self.image_size), COLORS[color])
        if self.task == "mmu":
            return {"task": "mmu", "image": image, "turns": [{"question": "What color is the image?", "answer": color}],
                    "meta": {"color": color}}
        return {"task": "t2i", "caption": f"a {color} square", "image": image, "codes": None, "meta": {"color": color}}


def build_solid_colors(task: str = "mmu", size: int = 64, image_size: int = 32, seed: int = 0) -> SolidColors:
    """Solid-colour images with colour questions or captions (example plugin)."""
    return SolidColors(task, size, image_size, seed)


@hookimpl
def register_datasets(register):
    register("solid_colors", build_solid_colors)


@hookimpl
def register_commands(app):
    import typer

    @app.command("solid-colors")
    def solid_colors(n: int = typer.Option(3, help="How many samples to show.")) -> None:
        """Print a few samples of the example plugin's dataset."""
        ds = SolidColors(size=n)
        for i in range(n):
            print(ds[i]["turns"][0]["answer"])
