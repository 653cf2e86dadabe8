"""Shared fixtures: small real safetensors files, a tmpfs directory, and sha256 of a byte range."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

Sha256Range = Callable[..., str]
MakeSafetensors = Callable[..., Path]

# Started from a background shell (``cmd &``), the test run inherits SIGINT ignored, and so would every patcher it
# starts: the Ctrl-C tests would then test nothing. A handled signal is reset to the default across exec, so the
# children get the ordinary Ctrl-C behaviour whatever started pytest.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _sha256_range(path: str | os.PathLike[str], start: int = 0, end: int | None = None) -> str:
    """Return the sha256 (hex) of bytes ``[start, end)`` of a file (``end=None``: to the end)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            chunk = handle.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


@pytest.fixture
def sha256_range() -> Sha256Range:
    """Hash a byte range of a file: ``sha256_range(path, start=0, end=None)``."""
    return _sha256_range


@pytest.fixture
def make_safetensors(tmp_path: Path) -> MakeSafetensors:
    """Build a real file with ``safetensors.numpy.save_file`` and random tensors.

    ``make_safetensors(name="model.safetensors", metadata=None, tensors=None, seed=0, directory=tmp_path)``;
    without ``tensors`` a few float32/int64/float16 arrays of a few KiB are made.
    """

    def make(
        name: str = "model.safetensors",
        metadata: Mapping[str, str] | None = None,
        tensors: Mapping[str, np.ndarray] | None = None,
        seed: int = 0,
        directory: Path | None = None,
    ) -> Path:
        rng = np.random.default_rng(seed)
        if tensors is None:
            tensors = {
                "blocks.0.weight": rng.standard_normal((64, 48)).astype(np.float32),
                "blocks.0.bias": rng.standard_normal((48,)).astype(np.float16),
                "blocks.1.index": rng.integers(-(2**40), 2**40, size=(300,), dtype=np.int64),
                "scale": np.asarray(rng.standard_normal(), dtype=np.float32),
            }
        path = (directory or tmp_path) / name
        save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata is not None else None)
        return path

    return make


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """Yield a fresh directory on /dev/shm (tmpfs: no insert-range), removed afterwards."""
    root = Path("/dev/shm")
    if not root.is_dir() or not os.access(root, os.W_OK):
        pytest.skip("/dev/shm is not available")
    path = root / f"npatch-test-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A running stand-in Hub (tests/hubserver.py) on 127.0.0.1; no token is sent unless a test passes one."""
    from hubserver import FakeHub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with FakeHub(lifetime=300) as server:
        yield server


@pytest.fixture
def hub(hub_server: Any) -> Any:
    """A :class:`patcher.hub.Hub` client of the stand-in Hub, without a token."""
    from patcher.hub import Hub

    return Hub(endpoint=hub_server.url, token=False)
