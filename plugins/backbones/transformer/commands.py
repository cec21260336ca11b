"""``omni convert mmmamba``: the mmMamba import as a sub-command of ``omni convert``, added through the
``register_commands`` hook like any plugin's command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def add_commands(app) -> None:
    import typer

    from omnicore.errors import OmnicoreError

    convert = next((g.typer_instance for g in app.registered_groups if g.name == "convert"), None)
    if convert is None:  # an application without the convert group: nothing to add to
        return

    @convert.command("mmmamba")
    def convert_mmmamba(source: Path = typer.Argument(..., help="The released mmMamba directory (config.json with "
                                                                 "model_type mmMamba_chat, safetensors)."),
                        out: Path = typer.Option(..., "--out", help="The model directory to write."),
                        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                                                 help="tokenizer.json or its folder (default: the "
                                                                      "release's own).")) -> None:
        """Convert a released mmMamba checkpoint into a model directory (HoVLE's image embedding and all its layers)."""
        from .mmmamba_import import convert_mmmamba as convert_release

        if out.exists() and not out.is_dir():
            raise OmnicoreError(f"--out {out}: exists and is not a directory")
        convert_release(source, out, tokenizer)
        typer.echo(f"wrote {out}")
