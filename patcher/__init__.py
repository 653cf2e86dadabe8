"""nunchaku-patch: give old SVDQuant .safetensors files the metadata Nunchaku needs, at the header level."""

from __future__ import annotations

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
