"""The exception tree of nunchaku-patch.

Every error the package raises for bad input or a failed operation derives from
:class:`PatchError` and renders as one line::

    FILE: what is wrong (expected X, got Y). what to do

The command-line layer maps the classes to exit codes in one place (``patcher.report``).
"""

from __future__ import annotations

import os


class PatchError(Exception):
    """Root of every error nunchaku-patch raises on purpose."""

    #: A stable, machine-readable identifier of the kind of problem (used by ``--json`` and tests).
    code: str = "error"

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        code: str | None = None,
        expected: object = None,
        got: object = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        if code is not None:
            self.code = code
        self.expected = expected
        self.got = got
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        """Return the one-line form: ``FILE: what (expected X, got Y). hint``."""
        text = self.message
        parts = []
        if self.expected is not None:
            parts.append(f"expected {self.expected}")
        if self.got is not None:
            parts.append(f"got {self.got}")
        if parts:
            text += f" ({', '.join(parts)})"
        if self.hint:
            text += f". {self.hint}"
        if self.path is not None:
            text = f"{self.path}: {text}"
        return " ".join(text.split("\n"))

    def with_path(self, path: str | os.PathLike[str]) -> PatchError:
        """Return this error naming ``path`` (used when a pure function raised it without one)."""
        if self.path is None:
            self.path = os.fspath(path)
            self.args = (self.render(),)
        return self


class HeaderError(PatchError):
    """The file is not a valid safetensors file (the reference reader would reject it too)."""

    code = "header"


class MetadataError(PatchError):
    """Metadata that cannot be written (non-string value, lone surrogate, too large)."""

    code = "metadata"


class InferenceError(PatchError):
    """The tensor table does not say what the model is, or contradicts itself."""

    code = "inference"


class ConfigError(PatchError):
    """No usable config was found, or the config contradicts the tensors."""

    code = "config"


class WriteError(PatchError):
    """A write could not be done safely; the file was left as it was."""

    code = "write"


class LockedError(WriteError):
    """Another process holds the file (a second patcher, or a reader when in-place is required)."""

    code = "locked"


class LinkError(WriteError):
    """The path is a symlink or a hard link and writing through it was not asked for."""

    code = "link"


class RecoveryError(WriteError):
    """An interrupted patch was found but cannot be finished or rolled back automatically."""

    code = "recovery"


class HubError(PatchError):
    """A Hugging Face Hub repo, revision or file could not be read (gated, private, missing, offline, network)."""

    code = "hub"


class UsageError(PatchError):
    """The options given do not make sense together."""

    code = "usage"
