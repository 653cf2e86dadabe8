"""The post-write check: one parse per patch, and a planned header is still proven before it is trusted.

A header in the writer layout is checked by composition (the planned tensor entries are byte for byte the entries
the strict reader accepted under the lock, and the metadata part decodes to what was asked); any other layout is
parsed again. Either way a planned header that is wrong is caught, and ``safetensors`` opens what was written.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open

from patcher import header as hdr
from patcher import splice
from patcher.errors import WriteError
from patcher.header import Header, parse_header, read_header, serialize_header, shares_tensor_table
from patcher.splice import Strategy, write_metadata
from tests.conftest import MakeSafetensors

META = {"config": json.dumps({"num_layers": 19}), "model_class": "NunchakuFluxTransformer2dModel"}


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count every call of the strict parser, wherever it is reached from."""
    calls: list[int] = []
    real: Callable[..., Header] = hdr.parse_header

    def counting(raw: bytes, *args: Any, **kwargs: Any) -> Header:
        calls.append(len(raw))
        return real(raw, *args, **kwargs)

    monkeypatch.setattr(hdr, "parse_header", counting)
    monkeypatch.setattr(splice, "parse_header", counting)
    yield calls


def _spaced_copy(path: Path, out: Path) -> Path:
    """Rewrite ``path`` with the same data and a header written with spaces (valid, but not the writer layout)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    document = json.loads(blob[8 : 8 + n])
    body = json.dumps(document, indent=1).encode()
    body += b" " * (-(8 + len(body)) % 8)
    out.write_bytes(struct.pack("<Q", len(body)) + body + blob[8 + n :])
    return out


def _metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "np") as handle:
        return dict(handle.metadata() or {})


@pytest.mark.parametrize("strategy", [Strategy.INSERT, Strategy.FIT, Strategy.COPY])
@pytest.mark.parametrize("existing", [None, {"keep": "me"}])
def test_a_patch_of_a_writer_layout_file_parses_its_header_once(
    make_safetensors: MakeSafetensors,
    parses: list[int],
    tmp_path: Path,
    strategy: Strategy,
    existing: dict[str, str] | None,
) -> None:
    path = make_safetensors(metadata=existing)
    if strategy is Strategy.FIT:
        # Room for the new metadata: patch once with a larger value, then shrink it.
        write_metadata(path, {**META, "pad": "x" * 2000})
    parses.clear()
    write_metadata(path, META, strategy=strategy)
    assert len(parses) == 1  # the read under the lock; the check after the write parses nothing
    assert _metadata_of(path) == META


def test_non_ascii_names_keep_the_fast_check(make_safetensors: MakeSafetensors, parses: list[int]) -> None:
    tensors = {"blöcke.0.gewicht": np.ones((3, 2), np.float32), "ß.weight": np.zeros(4, np.int8)}
    path = make_safetensors(tensors=tensors, metadata={"note": "größe ✓"})
    parses.clear()
    write_metadata(path, {**META, "note": "größe ✓"})
    assert len(parses) == 1
    with safe_open(str(path), "np") as handle:
        assert sorted(handle.keys()) == sorted(tensors)
        np.testing.assert_array_equal(handle.get_tensor("blöcke.0.gewicht"), tensors["blöcke.0.gewicht"])


def test_another_layout_is_checked_by_a_full_parse(
    make_safetensors: MakeSafetensors, parses: list[int], tmp_path: Path
) -> None:
    path = _spaced_copy(make_safetensors(), tmp_path / "spaced.safetensors")
    assert read_header(path).tensors_at is None
    parses.clear()
    write_metadata(path, META)
    assert len(parses) == 2  # the read, then the planned header parsed again
    assert _metadata_of(path) == META


# --------------------------------------------------------------------------------------------
# The composition itself


def _header(make_safetensors: MakeSafetensors, metadata: dict[str, str] | None = None) -> Header:
    return read_header(make_safetensors(metadata=metadata))


def test_the_planned_header_of_the_same_table_is_shown_sound(make_safetensors: MakeSafetensors) -> None:
    for existing in (None, {"a": "1"}):
        old = _header(make_safetensors, existing)
        assert old.tensors_at is not None
        for wanted in (META, {}, None):
            new = serialize_header(wanted, old.tensors)
            assert shares_tensor_table(old, new, wanted)
            # And it agrees with the full parse.
            parsed = parse_header(new)
            assert hdr.same_tensors(parsed.tensors, old.tensors)
            assert parsed.has_metadata_key == (wanted is not None)


def _flip_offset(body: bytes) -> bytes:
    """Change the first digit of the first tensor's data offsets (same length, another table)."""
    text = body.decode()
    at = text.index('"data_offsets":[') + len('"data_offsets":[')
    digit = text[at]
    swapped = "1" if digit != "1" else "2"
    return (text[:at] + swapped + text[at + 1 :]).encode()


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(_flip_offset, id="an offset changed"),
        pytest.param(lambda b: b.replace(b'"dtype":"F32"', b'"dtype":"I32"', 1), id="a dtype changed"),
        pytest.param(lambda b: b.replace(b'"model_class":', b'"x":"y","model_class":', 1), id="metadata grew"),
        pytest.param(lambda b: b.rstrip(b" ")[:-1] + b',"extra":{}}', id="an entry appended"),
        pytest.param(lambda b: b[:-1] + b"\n", id="padding not a space"),
        pytest.param(
            lambda b: b.replace(b'{"__metadata__":{', b'{"__metadata__":{"model_class":"X",', 1),
            id="a duplicate metadata key",
        ),
    ],
)
def test_a_wrong_planned_header_is_not_shown_sound(
    make_safetensors: MakeSafetensors, tamper: Callable[[bytes], bytes]
) -> None:
    old = _header(make_safetensors)
    good = serialize_header(META, old.tensors)
    bad = tamper(good)
    assert bad != good
    assert not shares_tensor_table(old, bad, META)


def test_metadata_other_than_asked_is_not_shown_sound(make_safetensors: MakeSafetensors) -> None:
    old = _header(make_safetensors)
    new = serialize_header(META, old.tensors)
    assert not shares_tensor_table(old, new, {**META, "config": "{}"})
    assert not shares_tensor_table(old, new, None)
    assert not shares_tensor_table(old, serialize_header(None, old.tensors), {})


@pytest.mark.parametrize("strategy", [Strategy.INSERT, Strategy.COPY])
def test_verification_refuses_a_wrong_planned_header(
    make_safetensors: MakeSafetensors, tmp_path: Path, strategy: Strategy
) -> None:
    """Bytes read back equal to a plan that is itself wrong: the check still refuses it (both paths)."""
    for spaced in (False, True):
        path = make_safetensors(name=f"m{spaced}.safetensors")
        if spaced:
            path = _spaced_copy(path, tmp_path / "spaced.safetensors")
        old = read_header(path)
        plan = splice.plan_write(old, META, path=path, block_size=4096, strategy=strategy)
        wrong = dataclasses.replace(plan, new_header_bytes=_flip_offset(plan.new_header_bytes))
        written = tmp_path / "written.safetensors"
        blob = path.read_bytes()
        written.write_bytes(wrong.new_prefix + blob[old.data_start :])
        with open(written, "rb") as handle, pytest.raises(WriteError) as caught:
            splice._verify(handle.fileno(), str(written), wrong, None)
        assert caught.value.code == "verify"
