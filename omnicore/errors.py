"""User-facing errors. Each carries a one-line message naming the file, field or plugin at fault."""

from __future__ import annotations


class OmnicoreError(Exception):
    """Base class for errors the CLI reports as one line with exit status 2."""


class PluginError(OmnicoreError):
    """A plugin is broken or conflicts with another."""


class UnknownComponentError(OmnicoreError, KeyError):
    """No component of that kind and name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ParamError(OmnicoreError, TypeError):
    """Parameters do not bind to a component's factory."""


class RecipeError(OmnicoreError, ValueError):
    """A recipe file is invalid; the message names file, line and key path."""


class CheckpointError(OmnicoreError):
    """A checkpoint or model directory is missing or malformed."""


class InputFileError(OmnicoreError, ValueError):
    """A file or directory given as input cannot be used: not a regular file, too large, not UTF-8 text,
    malformed JSON, or an image that cannot (or should not) be decoded. The message names the path."""


class OmnicoreWarning(UserWarning):
    """A warning the CLI shows as one ``warning: ...`` line: an input was used, but not as given."""
