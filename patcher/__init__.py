"""nunchaku-patch: give old SVDQuant .safetensors files the metadata Nunchaku needs, at the header level."""

from __future__ import annotations

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
from .header import (
    DTYPE_BITS,
    Header,
    TensorInfo,
    parse_file_bytes,
    parse_header,
    read_header,
    serialize_header,
)

__version__ = "0.1.0"

__all__ = [
    "DTYPE_BITS",
    "ConfigError",
    "Header",
    "HeaderError",
    "InferenceError",
    "LinkError",
    "LockedError",
    "MetadataError",
    "PatchError",
    "RecoveryError",
    "TensorInfo",
    "UsageError",
    "WriteError",
    "__version__",
    "parse_file_bytes",
    "parse_header",
    "read_header",
    "serialize_header",
]
