"""The ``omni`` command line: recipes, plugins, and the commands plugins add.

Errors the user can fix print as one line on stderr with exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

import omnicore
from omnicore.errors import OmnicoreError, OmnicoreWarning

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(help="omnicore: build, train and run unified multimodal state-space models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipe_app = typer.Typer(help="List, copy, validate and run recipe files.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
convert_app = typer.Typer(help="Convert released checkpoints into omnicore model directories.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")
export_app = typer.Typer(help="Write an omnicore model directory in a released checkpoint's layout.",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")

_STATE = {"debug": False}


# --- option checks: impossible values are refused before a model is loaded ---------------------------------------
def _at_least(option: str, value: int | float | None, low: int | float) -> None:
    if value is not None and not value >= low:  # "not >=" also refuses NaN
        raise OmnicoreError(f"{option}: must be at least {low} (got {value})")


def _finite(option: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise OmnicoreError(f"{option}: must be a finite number (got {value})")


def _probability(option: str, value: float | None) -> None:
    if value is not None and not 0 < value <= 1:
        raise OmnicoreError(f"{option}: must be in (0, 1] (got {value})")


def _seed(value: int | None) -> None:
    if value is not None and not -(2**63) <= value < 2**64:  # what torch.Generator.manual_seed takes
        raise OmnicoreError(f"--seed: must fit in 64 bits (got {value})")


DTYPES = ("float32", "bfloat16", "float16")
DTYPE_HELP = "float32, bfloat16 or float16 (default: the type the model was saved in)."


def _dtype(name: Optional[str]) -> Optional[str]:
    """--dtype as given: None (the saved type) or one of DTYPES; anything else is a one-line error."""
    if name is not None and name not in DTYPES:
        raise OmnicoreError(f"--dtype {name}: use {', '.join(DTYPES)}")
    return name


def _torch_dtype(name: Optional[str]):
    import torch

    return None if name is None else getattr(torch, name)


def _device(name: Optional[str]):
    from omnicore.runner import pick_device

    try:
        return pick_device(name)
    except RuntimeError:  # torch.device() of a malformed name
        raise OmnicoreError(f"--device {name}: not a device name (e.g. cpu, cuda, cuda:1, mps)") from None


def _output_dir(option: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise OmnicoreError(f"{option} {path}: exists and is not a directory")


def _version(value: bool) -> None:
    if value:
        console.print(f"omnicore {omnicore.__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors.")) -> None:
    _STATE["debug"] = debug or bool(os.environ.get("OMNICORE_DEBUG"))


@app.command("plugins")
def plugins_cmd(kind: Optional[str] = typer.Option(None, help="Only components of this kind."),
                pattern: str = typer.Option("*", help="Glob on component names.")) -> None:
    """List plugins (package, version, load errors) and the components they register."""
    from omnicore.plugin_host import host

    host.load()
    table = Table(title="plugins")
    for col in ("plugin", "package", "version", "status"):
        table.add_column(col, overflow="fold")  # never elide names: users copy them
    for info in sorted(host.plugins.values(), key=lambda p: (not p.builtin, p.name)):
        status = f"[red]failed: {info.error}[/red]" if info.error else "ok"
        table.add_row(info.name, info.package, info.version, status)
    console.print(table)
    comps = Table(title="components")
    for col in ("kind", "name", "package", "version"):
        comps.add_column(col, overflow="fold", no_wrap=False)
    comps.add_column("description", ratio=1)
    for c in omnicore.list_components(kind, pattern):
        comps.add_row(c.kind, c.name, c.package, c.version, c.description)
    console.print(comps)
    for info in host.errors:
        err_console.print(f"warning: plugin {info.name!r} from {info.package} failed to load: {info.error}")


@recipe_app.command("ls")
def recipe_ls() -> None:
    """List the recipes shipped with omnicore and its plugins."""
    table = Table()
    for col in ("recipe", "package", "description"):
        table.add_column(col)
    for c in omnicore.list_components("recipe"):
        table.add_row(c.name, c.package, c.description)
    console.print(table)


@recipe_app.command("cp")
def recipe_cp(name: str = typer.Argument(..., help="A recipe name from `omni recipe ls`."),
              dest: Path = typer.Argument(..., help="Destination file or directory."),
              force: bool = typer.Option(False, "--force", help="Overwrite an existing file.")) -> None:
    """Copy a shipped recipe out to edit it."""
    src = Path(omnicore.get_component("recipe", name.removesuffix(".yaml")).factory)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise OmnicoreError(f"{target}: already exists (use --force to overwrite)")
    if target.exists() and not target.is_file():
        raise OmnicoreError(f"{target}: exists and is not a regular file; not overwriting it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    console.print(f"copied {name} to {target}")


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe schema as JSON Schema (docs/recipes.md is generated from the same schema)."""
    import json

    from omnicore.recipe.reference import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@recipe_app.command("validate")
def recipe_validate(recipe: str = typer.Argument(..., help="Recipe file or name."),
                    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value or ~key.path")) -> None:
    """Check a recipe without building weights: schema, registered names, params, stage references."""
    from omnicore.recipe import load_recipe
    from omnicore.recipe.validate import validate_recipe

    loaded = load_recipe(recipe, overrides or [])
    problems = validate_recipe(loaded)
    if problems:
        for p in problems:
            err_console.print(p, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    console.print(f"{loaded.path}: ok ({len(loaded.recipe.stages)} stages"
                  f"{', inference' if loaded.recipe.inference else ''})")


@recipe_app.command("run")
def recipe_run(recipe: str = typer.Argument(..., help="Recipe file or name."),
               overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value or ~key.path"),
               run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/<recipe>-<time>)."),
               resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's last checkpoint."),
               nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="Processes to launch through torchrun."),
               device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available).")) -> None:
    """Run a recipe: its training stages, evaluation and inference, into a run directory."""
    from omnicore.runner import launch_distributed, run_recipe

    _at_least("--nproc-per-node", nproc_per_node, 1)
    if run_dir is not None:
        _output_dir("--run-dir", run_dir)
    if device is not None:
        _device(device)
    if nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(launch_distributed(sys.argv, nproc_per_node))
    run_recipe(recipe, overrides or [], run_dir=run_dir, resume=resume, device=device, console=console)


@app.command("generate")
def generate_cmd(prompts: list[str] = typer.Argument(..., help="Captions to draw."),
                 model: Path = typer.Option(..., "--model", help="A model directory (omnicore.load)."),
                 out: Path = typer.Option(Path("generated"), "--out", help="Output directory for PNGs and grid.png."),
                 n: int = typer.Option(1, "--n", help="Images per prompt."),
                 guidance_scale: float = typer.Option(1.0, "--guidance-scale", help="Classifier-free guidance (1: off)."),
                 negative_prompt: Optional[str] = typer.Option(
                     None, "--negative-prompt", help="Guidance pushes away from this prompt instead of the "
                     "unconditional one (all prompts; needs --guidance-scale other than 1)."),
                 temperature: Optional[float] = typer.Option(
                     None, "--temperature", help="0: greedy. Default: the model's own (greedy for a converted "
                     "OmniMamba, as its release draws; else 1)."),
                 top_k: Optional[int] = typer.Option(None, "--top-k"),
                 top_p: Optional[float] = typer.Option(None, "--top-p"),
                 seed: Optional[int] = typer.Option(None, "--seed"),
                 batch_size: int = typer.Option(16, "--batch-size"),
                 device: Optional[str] = typer.Option(None, "--device"),
                 dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP)) -> None:
    """Generate images from text prompts: a PNG per image and a grid."""
    from rich.progress import Progress

    from omnicore.generation.api import caption_truncation, generate_images, image_grid

    _at_least("--n", n, 1)
    _at_least("--batch-size", batch_size, 1)
    _finite("--guidance-scale", guidance_scale)
    _finite("--temperature", temperature)
    _at_least("--temperature", temperature, 0)
    _at_least("--top-k", top_k, 1)
    _probability("--top-p", top_p)
    _seed(seed)
    if negative_prompt is not None and guidance_scale == 1.0:
        raise OmnicoreError("--negative-prompt: has no effect at --guidance-scale 1; give a guidance scale (e.g. 4)")
    _output_dir("--out", out)
    dev, dtype = _device(device), _dtype(dtype)
    pipe = omnicore.load(model, device=dev, dtype=_torch_dtype(dtype))
    note = caption_truncation(pipe, prompts, [negative_prompt])
    if note:  # once for the whole call, not once per batch
        err_console.print(f"warning: {note}", markup=False, highlight=False, soft_wrap=True)
    out.mkdir(parents=True, exist_ok=True)
    # only the options given: with none, the model's own T2I defaults apply (generation.api.t2i_sampling_options)
    decoding = {k: v for k, v in {"temperature": temperature, "top_k": top_k, "top_p": top_p}.items() if v is not None}
    images = []
    with Progress(console=console) as progress:
        bar = progress.add_task("generating", total=len(prompts) * n)
        for start in range(0, len(prompts), batch_size):
            images += generate_images(pipe, prompts[start:start + batch_size], n_per_prompt=n,
                                      guidance_scale=guidance_scale, negative_prompts=negative_prompt,
                                      seed=seed, batch_size=batch_size, warn_truncated=False, **decoding)
            progress.update(bar, completed=len(images))
    for i, im in enumerate(images):
        im.save(out / f"{i // n:04d}-{i % n}.png")
    image_grid(images).save(out / "grid.png")
    console.print(f"wrote {len(images)} images and grid.png to {out}")


@app.command("ask")
def ask_cmd(image: Optional[str] = typer.Argument(..., help="Image file ('-' for a text-only question)."),
            question: str = typer.Argument(..., help="The question."),
            model: Path = typer.Option(..., "--model", help="A model directory (omnicore.load)."),
            max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
            temperature: float = typer.Option(0.0, "--temperature", help="0: greedy."),
            device: Optional[str] = typer.Option(None, "--device"),
            dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP)) -> None:
    """Answer a question about an image, streaming the answer to the terminal."""
    from omnicore.inputs import open_image

    _at_least("--max-new-tokens", max_new_tokens, 1)
    _finite("--temperature", temperature)
    _at_least("--temperature", temperature, 0)
    dev, dtype = _device(device), _dtype(dtype)
    picture = None if image == "-" else open_image(image)  # a bad image fails before the model loads
    pipe = omnicore.load(model, device=dev, dtype=_torch_dtype(dtype))
    for piece in pipe.stream_answer(picture, question, max_new_tokens=max_new_tokens, temperature=temperature):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@convert_app.command("omnimamba")
def convert_omnimamba(checkpoint: Path = typer.Option(..., "--checkpoint", help="OmniMamba-1.3b.pth (the release)."),
                      tokenizer: Path = typer.Option(..., "--tokenizer",
                                                     help="GPT-NeoX-20B's tokenizer.json or its directory."),
                      vq: Path = typer.Option(..., "--vq", help="LlamaGen's vq_ds16_t2i.pt."),
                      dino: Path = typer.Option(..., "--dino", help="DINOv2 ViT-L/14-reg4 weights (timm names)."),
                      siglip: Path = typer.Option(..., "--siglip",
                                                  help="SigLIP SO400M/14-384 weights (timm or open_clip)."),
                      out: Path = typer.Option(..., "--out", help="The model directory to write."),
                      template: str = typer.Option("omnimamba-chat", "--template",
                                                   help="MMU prompt: omnimamba-chat (the released inference's), "
                                                        "omnimamba-train, omnicore, or a text with {question}."),
                      vision_size: str = typer.Option("full", "--vision-size", help="full, or tiny (test towers)."),
                      max_caption_tokens: int = typer.Option(68, "--max-caption-tokens")) -> None:
    """Convert the released OmniMamba checkpoint (+ tokenizer, VQ and vision files) into a model directory."""
    from omnicore.convert.omnimamba import convert

    if vision_size not in ("full", "tiny"):
        raise OmnicoreError(f"--vision-size {vision_size}: use full or tiny")
    _at_least("--max-caption-tokens", max_caption_tokens, 1)
    _output_dir("--out", out)
    convert(checkpoint, tokenizer, vq, dino, siglip, out, mmu_template=template, vision_size=vision_size,
            max_caption_tokens=max_caption_tokens)
    console.print(f"wrote {out}")


@export_app.command("omnimamba")
def export_omnimamba(model: Path = typer.Argument(..., help="A model directory (omnicore.load)."),
                     out: Path = typer.Option(..., "--out", help="The .pth file to write.")) -> None:
    """Write a model directory in the released OmniMamba checkpoint's layout (fp16, its names)."""
    from omnicore.convert.omnimamba import export

    if out.exists() and out.is_dir():
        raise OmnicoreError(f"--out {out}: is a directory")
    export(model, out)
    console.print(f"wrote {out}")


@app.command("serve")
def serve_cmd(model: Path = typer.Option(..., "--model", help="A model directory (omnicore.load)."),
              host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: loopback only)."),
              port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
              device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if "
                                                   "available)."),
              dtype: Optional[str] = typer.Option(None, "--dtype", help="The type the model runs in: " + DTYPE_HELP),
              max_batch: int = typer.Option(32, "--max-batch", help="Sequences decoding at once per task (answers; "
                                            "images, each with its guidance row)."),
              max_queue: int = typer.Option(256, "--max-queue", help="Requests waiting beyond the running batch; "
                                            "more get 429."),
              api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OMNI_API_KEY",
                                                    help="Require 'Authorization: Bearer KEY' on /v1/ endpoints."),
              max_body_mb: float = typer.Option(20.0, "--max-body-mb", help="Largest request body, in MiB."),
              max_n: Optional[int] = typer.Option(None, "--max-n", help="Largest n (answers or images) of one "
                                                  "request (default: 16, or --max-batch if smaller)."),
              max_tokens: int = typer.Option(1024, "--max-tokens", help="Largest max_tokens of an answer."),
              name: Optional[str] = typer.Option(None, "--name", help="The model name clients give (default: the "
                                                 "directory's name)."),
              threads: Optional[int] = typer.Option(None, "--threads", help="torch's CPU threads where the model "
                                                    "steps (default: torch's own choice)."),
              engine: str = typer.Option("process", "--engine", help="process: the model steps in a process of its "
                                         "own, beside the HTTP server's; thread: in the server's process."),
              replicas: int = typer.Option(1, "--replicas", help="Engine processes, each with the whole model "
                                           "(CPU only): requests go to the least busy one."),
              log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error.")) -> None:
    """Serve a model over HTTP: OpenAI-compatible chat completions and image generations, a page at /."""
    try:
        from omnicore.serve.app import ServeOptions
        from omnicore.serve.protocol import Limits
        from omnicore.serve.server import serve
    except ImportError as exc:
        raise OmnicoreError(f"omni serve needs the serve extra (pip install 'omnicore[serve]'): {exc}") from None

    _at_least("--port", port, 0)
    if port > 65535:
        raise OmnicoreError(f"--port: must be at most 65535 (got {port})")
    _at_least("--max-batch", max_batch, 1)
    _at_least("--max-queue", max_queue, 1)
    _finite("--max-body-mb", max_body_mb)
    _at_least("--max-body-mb", max_body_mb, 0.001)
    max_n = min(16, max_batch) if max_n is None else max_n
    _at_least("--max-n", max_n, 1)
    if max_n > 16:
        raise OmnicoreError(f"--max-n: at most 16, the Python API's decoding batch (got {max_n})")
    _at_least("--max-tokens", max_tokens, 1)
    if max_n > max_batch:
        raise OmnicoreError(f"--max-n {max_n}: more than --max-batch {max_batch}; such a request could never run")
    if api_key is not None and not api_key.strip():
        raise OmnicoreError("--api-key: must not be empty")
    _at_least("--threads", threads, 1)
    if engine not in ("process", "thread"):
        raise OmnicoreError(f"--engine {engine}: use process or thread")
    _at_least("--replicas", replicas, 1)
    if replicas > 1 and engine != "process":
        raise OmnicoreError(f"--replicas {replicas}: replicas are engine processes; use --engine process")
    if log_level not in ("debug", "info", "warning", "error"):
        raise OmnicoreError(f"--log-level {log_level}: use debug, info, warning or error")
    if not model.is_dir():
        raise OmnicoreError(f"--model {model}: not a model directory "
                            f"({'does not exist' if not model.exists() else 'not a directory'})")
    dev, dtype = _device(device), _dtype(dtype)
    if replicas > 1 and dev.type != "cpu":
        raise OmnicoreError(f"--replicas {replicas}: replicas run on the CPU only (--device {dev}: one engine "
                            "holds the GPU)")
    options = ServeOptions(model_dir=model, device=dev, max_batch=max_batch, max_queue=max_queue,
                           api_key=api_key, max_body_bytes=int(max_body_mb * (1 << 20)),
                           limits=Limits(max_n=max_n, max_tokens=max_tokens), name=name, engine=engine,
                           threads=threads, replicas=replicas, dtype=dtype)
    serve(options, host=host, port=port, log_level=log_level)


@app.command("pretokenize")
def pretokenize_cmd(folder: Path = typer.Argument(..., help="Images with same-stem .txt captions."),
                    out: Path = typer.Option(..., "--out", help="The JSONL file to write (caption + codes)."),
                    model: Optional[Path] = typer.Option(None, "--model", help="A model directory whose tokenizer to use."),
                    recipe: Optional[str] = typer.Option(None, "--recipe", help="Or: a recipe whose model.image_tokenizer to build."),
                    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize to this (default: the model's)."),
                    batch_size: int = typer.Option(16, "--batch-size"),
                    device: Optional[str] = typer.Option(None, "--device")) -> None:
    """Run the image tokenizer over an image+caption folder into T2I JSONL."""
    from omnicore.pretokenize import pretokenize

    _at_least("--batch-size", batch_size, 1)
    _at_least("--image-size", image_size, 1)
    n = pretokenize(folder, out, model_dir=model, recipe=recipe, image_size=image_size, batch_size=batch_size,
                    device=_device(device), console=console)
    console.print(f"wrote {n} records to {out}")


def _add_plugin_commands() -> None:
    try:
        from omnicore.plugin_host import host

        host.pm.hook.register_commands(app=app)
    except Exception as exc:  # a plugin's command must not break the CLI
        err_console.print(f"warning: a plugin failed to add commands: {exc}")


def _show_warning(message, category, filename, lineno, file=None, line=None, *, fallback) -> None:
    """omnicore's own warnings as one ``warning: ...`` line; others as Python (or ``fallback``) shows them."""
    if issubclass(category, OmnicoreWarning):
        err_console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)
    else:
        fallback(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    _add_plugin_commands()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or bool(os.environ.get("OMNICORE_DEBUG"))
    with warnings.catch_warnings():  # puts showwarning back when main returns (tests call it in-process)
        warnings.showwarning = functools.partial(_show_warning, fallback=warnings.showwarning)
        return _run(argv, debug)


def _run(argv: list[str] | None, debug: bool) -> int:
    try:
        rc = app(args=argv, prog_name="omni", standalone_mode=False)
    except OmnicoreError as exc:
        if debug:
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code or 0
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except typer.TyperException as exc:
        # Usage errors (exit 2, with click's usage line). Typer raises the ClickException of the click it
        # vendors (typer._click), not of the installed click package, so `isinstance(exc,
        # click.ClickException)` never matched; TyperException is typer's public base class of them.
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            err_console.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except Exception as exc:
        if debug:
            raise
        err_console.print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                          markup=False, highlight=False, soft_wrap=True)
        return 1
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
