"""nunchaku-patch: give old SVDQuant .safetensors files the metadata Nunchaku needs, at the header level.

The names below are imported on first use (PEP 562), so ``import patcher.header`` or the command line
pays only for the modules it needs: ``from patcher import write_metadata`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .contract import validate_metadata
    from .errors import (
        ConfigError,
        HeaderError,
        InferenceError,
        LinkError,
        LockedError,
        MetadataError,
        PatchError,
        RecoveryError,
        UsageError,
        WriteError,
    )
    from .facts import Family, Inference
    from .header import (
        DTYPE_BITS,
        Header,
        TensorInfo,
        parse_file_bytes,
        parse_header,
        read_header,
        serialize_header,
    )
    from .inspect import infer
    from .metadata import build_entries, merge_metadata
    from .splice import Strategy, WriteResult, recover, restore, write_metadata

__version__ = "0.1.0"

#: Where each public name lives.
_EXPORTS = {
    "validate_metadata": "contract",
    "ConfigError": "errors",
    "HeaderError": "errors",
    "InferenceError": "errors",
    "LinkError": "errors",
    "LockedError": "errors",
    "MetadataError": "errors",
    "PatchError": "errors",
    "RecoveryError": "errors",
    "UsageError": "errors",
    "WriteError": "errors",
    "Family": "facts",
    "Inference": "facts",
    "DTYPE_BITS": "header",
    "Header": "header",
    "TensorInfo": "header",
    "parse_file_bytes": "header",
    "parse_header": "header",
    "read_header": "header",
    "serialize_header": "header",
    "infer": "inspect",
    "build_entries": "metadata",
    "merge_metadata": "metadata",
    "Strategy": "splice",
    "WriteResult": "splice",
    "recover": "splice",
    "restore": "splice",
    "write_metadata": "splice",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "DTYPE_BITS",
    "ConfigError",
    "Family",
    "Header",
    "HeaderError",
    "Inference",
    "InferenceError",
    "LinkError",
    "LockedError",
    "MetadataError",
    "PatchError",
    "RecoveryError",
    "Strategy",
    "TensorInfo",
    "UsageError",
    "WriteError",
    "WriteResult",
    "__version__",
    "build_entries",
    "infer",
    "merge_metadata",
    "parse_file_bytes",
    "parse_header",
    "read_header",
    "recover",
    "restore",
    "serialize_header",
    "validate_metadata",
    "write_metadata",
]
