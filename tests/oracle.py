"""The reference reader as a test oracle, and a builder of small real safetensors files.

``oracle_accepts`` asks the real ``safetensors`` package (Rust, the reference implementation) whether
a file is valid; ``write_safetensors`` builds small files with ``safetensors.numpy.save_file``, or by
hand for the dtypes numpy has no type for, laid out the way the reference writer does.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from patcher.header import ALIGNMENT, DTYPE_BITS, PREFIX_SIZE

# Anonymous temp files for byte blobs go to RAM when it is available: the fuzz tests write thousands.
_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

#: Dtypes numpy can hold natively, with the numpy dtype ``save_file`` maps back to the safetensors name.
NUMPY_DTYPES: Mapping[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}

DataFill = Literal["random", "zeros"]


def oracle_accepts(path_or_bytes: str | os.PathLike[str] | bytes) -> bool:
    """Return whether ``safetensors.safe_open`` accepts the file (or the bytes, written to a temp file)."""
    if isinstance(path_or_bytes, bytes):
        with tempfile.NamedTemporaryFile(dir=_SCRATCH, suffix=".safetensors") as tmp:
            tmp.write(path_or_bytes)
            tmp.flush()
            return _accepts(tmp.name)
    return _accepts(os.fspath(path_or_bytes))


def _accepts(path: str) -> bool:
    try:
        with safe_open(path, framework="np") as f:
            f.metadata()
            f.keys()
    except Exception:  # the bindings raise SafetensorError, OSError or ValueError depending on the cause
        return False
    return True


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Return the byte length of a tensor of ``dtype`` and ``shape`` (whole bytes required)."""
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"{dtype} {list(shape)} does not fill whole bytes")
    return bits // 8


def _fill(nbytes: int, data: DataFill, seed: int) -> bytes:
    if data == "zeros":
        return bytes(nbytes)
    return np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8).tobytes()


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, tuple[str, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
    data: DataFill = "random",
) -> Path:
    """Write a small real safetensors file with the given ``{name: (dtype, shape)}`` and return its path."""
    target = Path(path)
    if all(dtype in NUMPY_DTYPES for dtype, _ in tensors.values()):
        arrays = {}
        for index, (name, (dtype, shape)) in enumerate(tensors.items()):
            raw = _fill(tensor_nbytes(dtype, shape), data, index)
            array = np.frombuffer(raw, dtype=NUMPY_DTYPES[dtype]).reshape(tuple(shape))
            if dtype == "BOOL":
                array = array.view(np.uint8).astype(bool)  # random bytes are no valid bools: keep 0/1
            arrays[name] = array
        save_file(arrays, os.fspath(target), metadata=dict(metadata) if metadata is not None else None)
        return target
    target.write_bytes(build_file(tensors, metadata, data))
    return target


def build_file(
    tensors: Mapping[str, tuple[str, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
    data: DataFill = "random",
) -> bytes:
    """Return the bytes of a valid file laid out like the reference writer (any dtype, by hand)."""
    # The reference writer orders by descending dtype alignment, then name; any contiguous order is valid.
    order = sorted(tensors, key=lambda name: (-DTYPE_BITS[tensors[name][0]], name))
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    position = 0
    chunks: list[bytes] = []
    for index, name in enumerate(order):
        dtype, shape = tensors[name]
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        chunks.append(_fill(nbytes, data, index))
        position += nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(PREFIX_SIZE + len(body)) % ALIGNMENT)
    return struct.pack("<Q", len(body)) + body + b"".join(chunks)


def oracle_read(path: str | os.PathLike[str]) -> tuple[dict[str, str] | None, list[str]]:
    """Return what ``safe_open`` reads from a valid file: its metadata and its tensor names (sorted)."""
    with safe_open(os.fspath(path), framework="np") as f:
        metadata = f.metadata()
        return (dict(metadata) if metadata is not None else None), sorted(f.keys())
