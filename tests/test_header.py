"""The strict header parser and the serializer, checked against the fixture corpus and the reference reader."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import struct
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from oracle import build_file, oracle_accepts, oracle_read, write_safetensors
from safetensors.numpy import save

from patcher.errors import HeaderError, MetadataError
from patcher.header import (
    ALIGNMENT,
    METADATA_KEY,
    PREFIX_SIZE,
    Header,
    TensorInfo,
    metadata_equal,
    pack_prefix,
    parse_file_bytes,
    parse_header,
    read_header,
    same_tensors,
    serialize_header,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
INVALID = FIXTURES / "invalid"
VALID = FIXTURES / "valid"


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Return a corpus folder's MANIFEST.json."""
    data: dict[str, dict[str, Any]] = json.loads((folder / "MANIFEST.json").read_text(encoding="utf-8"))
    return data


INVALID_CASES = sorted(manifest(INVALID).items())
VALID_CASES = sorted(manifest(VALID).items())


def load_generator() -> ModuleType:
    """Import scripts/make_invalid_fixtures.py (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(
        "make_invalid_fixtures", ROOT / "scripts" / "make_invalid_fixtures.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# The corpus itself


def test_corpus_is_large_and_matches_its_manifest() -> None:
    assert len(INVALID_CASES) >= 30
    assert len(VALID_CASES) >= 8
    for folder in (INVALID, VALID):
        on_disk = {p.name for p in folder.glob("*.safetensors")}
        assert on_disk == set(manifest(folder)), f"{folder} and its MANIFEST.json list different files"


def test_corpus_is_what_the_generator_writes(tmp_path: Path) -> None:
    generator = load_generator()
    count = generator.write(tmp_path)
    assert count == len(INVALID_CASES) + len(VALID_CASES)
    for sub in ("invalid", "valid"):
        committed = sorted(p.name for p in (FIXTURES / sub).iterdir())
        assert sorted(p.name for p in (tmp_path / sub).iterdir()) == committed
        for name in committed:
            assert (tmp_path / sub / name).read_bytes() == (FIXTURES / sub / name).read_bytes(), (
                f"{sub}/{name} is stale: run scripts/make_invalid_fixtures.py"
            )


def test_invalid_corpus_covers_every_error_code() -> None:
    codes = {info["code"] for _, info in INVALID_CASES}
    assert codes >= {
        "too-small",
        "header-too-large",
        "header-past-eof",
        "invalid-utf8",
        "invalid-json",
        "not-object",
        "bom",
        "bad-padding",
        "duplicate-metadata",
        "duplicate-field",
        "missing-field",
        "bad-metadata",
        "bad-metadata-value",
        "bad-entry",
        "bad-dtype",
        "unknown-dtype",
        "bad-shape",
        "bad-offsets",
        "invalid-offset",
        "size-mismatch",
        "overflow",
        "misaligned-slice",
        "trailing-data",
        "missing-data",
    }


# --------------------------------------------------------------------------------------------
# Invalid files: our code and the reference reader both reject, with the manifest's code


@pytest.mark.parametrize(("name", "info"), INVALID_CASES, ids=[name for name, _ in INVALID_CASES])
def test_invalid_fixture_rejected_by_both(name: str, info: dict[str, Any]) -> None:
    path = INVALID / name
    with pytest.raises(HeaderError) as caught:
        read_header(path)
    error = caught.value
    assert error.code == info["code"], f"{name}: {info['description']}: {error}"
    text = str(error)
    assert text.startswith(f"{path}: "), text
    assert "\n" not in text
    assert not oracle_accepts(path), f"the reference reader accepts {name}: the fixture is wrong"


@pytest.mark.parametrize(("name", "info"), INVALID_CASES, ids=[name for name, _ in INVALID_CASES])
def test_invalid_fixture_same_code_from_bytes(name: str, info: dict[str, Any]) -> None:
    blob = (INVALID / name).read_bytes()
    with pytest.raises(HeaderError) as caught:
        parse_file_bytes(blob, source=name)
    assert caught.value.code == info["code"]
    assert str(caught.value).startswith(f"{name}: ")


# --------------------------------------------------------------------------------------------
# Valid files: both accept, and read the same tensors and metadata


@pytest.mark.parametrize(("name", "info"), VALID_CASES, ids=[name for name, _ in VALID_CASES])
def test_valid_fixture_accepted_by_both(name: str, info: dict[str, Any]) -> None:
    path = VALID / name
    header = read_header(path)
    assert len(header.tensors) == info["tensors"]
    assert header.data_len == info["data_len"]
    assert header.file_size == path.stat().st_size
    expected_metadata = info["metadata"]
    assert (dict(header.metadata) if header.metadata is not None else None) == expected_metadata
    assert oracle_accepts(path)
    oracle_metadata, oracle_names = oracle_read(path)
    assert oracle_metadata == expected_metadata
    assert oracle_names == sorted(header.tensors)


def test_valid_fixture_details() -> None:
    lead = read_header(VALID / "leading-whitespace.safetensors")
    assert lead.leading_whitespace == 4
    assert any("A1111" in note for note in lead.warnings)
    unpadded = read_header(VALID / "unpadded.safetensors")
    assert not unpadded.aligned
    assert unpadded.padding == 0
    duplicate = read_header(VALID / "duplicate-tensor-name.safetensors")
    assert duplicate.duplicate_keys == ("a",)
    assert duplicate.tensors["a"].shape == (2, 2)  # the last entry wins
    extra = read_header(VALID / "extra-entry-fields.safetensors").tensors["a"]
    assert [key for key, _ in extra.extra] == ["x"]
    assert extra.extra[0][1]["note"] == "kept"
    not_first = read_header(VALID / "metadata-not-first.safetensors")
    assert not not_first.metadata_first
    assert read_header(VALID / "metadata-null.safetensors").has_metadata_key
    scalars = read_header(VALID / "scalars.safetensors")
    assert scalars.tensors["s"].shape == () and scalars.tensors["s"].numel == 1
    every = read_header(VALID / "every-dtype.safetensors")
    assert {info.dtype for info in every.tensors.values()} == {
        "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
        "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
    }  # fmt: skip


def test_sequence_and_tagged_entries_read_and_normalised_on_write() -> None:
    # safetensors (serde) reads a tensor entry written as [dtype, shape, data_offsets] and a dtype written as
    # {"F32": null}; we read them to the same table and write them back in the usual form.
    sequence = read_header(VALID / "sequence-entries.safetensors")
    assert sequence.tensors["a"] == TensorInfo("F32", (2, 2), (0, 16))
    assert sequence.tensors["b"] == TensorInfo("U8", (8,), (16, 24))
    assert sequence.tensors["c"] == TensorInfo("F16", (4,), (24, 32))
    assert sequence.irregular_entries == ("a", "b", "c")
    assert any("sequence form" in note for note in sequence.warnings)
    tagged = read_header(VALID / "dtype-tagged.safetensors")
    assert [info.dtype for info in tagged.tensors.values()] == ["F32", "BF16"]
    assert tagged.irregular_entries == ("a", "b")
    for header in (sequence, tagged):
        rewritten = serialize_header(header.metadata, header.tensors)
        text = rewritten.decode("utf-8")
        assert "null" not in text and ':["' not in text
        again = parse_header(rewritten, PREFIX_SIZE + len(rewritten) + header.data_len)
        assert dict(again.tensors) == dict(header.tensors)
        assert again.irregular_entries == ()


def test_parse_memory_follows_the_header() -> None:
    # A writer-layout header is read straight into the table, without the decoded JSON document beside it:
    # the peak stays a small multiple of the header (the document alone took about 10x).
    import tracemalloc

    from patcher import synth

    table = synth.build_table(synth.preset("flux.1-dev", num_single_layers=38 + 220))
    tensors = synth.table_to_tensors(dict(list(table.items())[:10_000]))
    raw = serialize_header({"format": "pt", "config": json.dumps({"a": "\u00e9 \\ \""})}, tensors)
    file_size = PREFIX_SIZE + len(raw) + synth.data_size(tensors)
    tracemalloc.start()
    try:
        header = parse_header(raw, file_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(header.tensors) == 10_000
    assert peak < 7 * len(raw), f"peak {peak:,} bytes for a {len(raw):,}-byte header"
    # Tensors with the same shape share one tuple.
    shapes = {id(info.shape) for info in header.tensors.values()}
    assert len(shapes) < 200


def test_real_files_from_the_reference_writer(tmp_path: Path) -> None:
    tensors = {
        "transformer_blocks.0.qkv_proj.qweight": ("I8", [384, 64]),
        "transformer_blocks.0.qkv_proj.wscales": ("F16", [2, 384]),
        "x_embedder.weight": ("F32", [16, 64]),
        "flag": ("BOOL", [3]),
        "step": ("I64", []),
    }
    metadata = {"format": "pt", "config": json.dumps({"a": [1, 2]}), "é": "ü"}
    path = write_safetensors(tmp_path / "real.safetensors", tensors, metadata)
    header = read_header(path)
    assert header.aligned and header.leading_whitespace == 0
    assert metadata_equal(header.metadata, metadata)
    assert {name: (info.dtype, list(info.shape)) for name, info in header.tensors.items()} == tensors
    hand = write_safetensors(tmp_path / "hand.safetensors", {"w": ("BF16", [4, 4]), "s": ("F8_E4M3", [8])}, None)
    assert oracle_accepts(hand)
    assert read_header(hand).data_len == 4 * 4 * 2 + 8


# --------------------------------------------------------------------------------------------
# Serializer


def test_serializer_golden_bytes() -> None:
    tensors = {"w": TensorInfo("F32", (3,), (0, 12))}
    out = serialize_header({"format": "pt"}, tensors)
    assert out == b'{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}  '
    assert (PREFIX_SIZE + len(out)) % ALIGNMENT == 0
    # Byte for byte what the reference writer produces for the same tensor and metadata.
    reference = save({"w": np.zeros(3, dtype=np.float32)}, metadata={"format": "pt"})
    assert pack_prefix(out) == reference[: PREFIX_SIZE + len(out)]


@pytest.mark.parametrize("name", sorted(path.name for path in VALID.glob("*.safetensors")))
def test_serializer_writes_what_json_dumps_writes(name: str) -> None:
    # Entries are formatted one by one; the bytes must be those of json.dumps on the whole object.
    header = read_header(VALID / name)
    metadata = {"format": "pt", "é\n": 'ü "😀" \\', "config": json.dumps({"a": [1, 2]})}
    for meta in (None, metadata):
        expected: dict[str, Any] = {} if meta is None else {METADATA_KEY: meta}
        expected.update((key, info.to_json_obj()) for key, info in header.tensors.items())
        reference = json.dumps(expected, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        assert serialize_header(meta, header.tensors).rstrip(b" ") == reference


def test_serializer_empty() -> None:
    assert serialize_header(None, {}) == b"{}      "
    assert serialize_header({}, {}) == b'{"__metadata__":{}}     '


def test_serializer_order_and_extra_fields() -> None:
    tensors = {
        "z.last_name_first": TensorInfo("BF16", (2, 2), (0, 8), (("note", "kept"), ("nested", {"k": [1, None]}))),
        "a.first_name_last": TensorInfo("U8", (4,), (8, 12)),
    }
    out = serialize_header({"b": "2", "a": "1"}, tensors)
    text = out.decode("utf-8")
    assert text.startswith('{"__metadata__":{"b":"2","a":"1"},')
    assert text.index('"z.last_name_first"') < text.index('"a.first_name_last"')
    assert '"data_offsets":[0,8],"note":"kept","nested":{"k":[1,null]}}' in text
    header = parse_header(out)
    assert list(header.tensors) == list(tensors)
    assert header.tensors["z.last_name_first"].extra == tensors["z.last_name_first"].extra


def test_serializer_starts_with_brace_quote_and_pads_with_spaces_only() -> None:
    tensors = {"t": TensorInfo("F16", (1,), (0, 2))}
    for metadata in (None, {"k": "v"}):
        out = serialize_header(metadata, tensors)
        assert out.startswith(b'{"')
        body = out.rstrip(b" ")
        assert body.endswith(b"}")
        assert set(out[len(body) :]) <= {0x20}


def test_serializer_length_padding_and_no_fit() -> None:
    tensors = {"t": TensorInfo("F16", (1,), (0, 2))}
    out = serialize_header({"k": "v"}, tensors, length=200)
    assert len(out) == 200
    assert out.endswith(b" " * 100)
    assert parse_header(out, PREFIX_SIZE + 200 + 2).padding == 200 - len(out.rstrip(b" "))
    minimal = len(serialize_header({"k": "v"}, tensors).rstrip(b" "))
    assert len(serialize_header({"k": "v"}, tensors, length=minimal)) == minimal
    with pytest.raises(MetadataError) as caught:
        serialize_header({"k": "v"}, tensors, length=minimal - 1)
    assert caught.value.code == "no-fit"


@pytest.mark.parametrize(
    "metadata",
    [{"k": "\ud800"}, {"k": "a\udfffb"}, {"\udc00": "v"}],
    ids=["high-surrogate-value", "low-surrogate-value", "surrogate-key"],
)
def test_serializer_refuses_lone_surrogates(metadata: dict[str, str]) -> None:
    with pytest.raises(MetadataError) as caught:
        serialize_header(metadata, {})
    assert caught.value.code == "lone-surrogate"
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value", [1, 1.5, None, True, ["x"], {"k": "v"}, b"bytes"])
def test_serializer_refuses_non_str_values(value: object) -> None:
    with pytest.raises(MetadataError) as caught:
        serialize_header({"k": value}, {})  # type: ignore[dict-item]
    assert caught.value.code == "bad-metadata-value"
    with pytest.raises(MetadataError):
        serialize_header({1: "v"}, {})  # type: ignore[dict-item]


def test_serializer_keeps_a_surrogate_pair() -> None:
    out = serialize_header({"emoji": "😀"}, {})
    assert "😀".encode() in out
    assert oracle_accepts(pack_prefix(out))


@pytest.mark.parametrize(("name", "info"), VALID_CASES, ids=[name for name, _ in VALID_CASES])
def test_round_trip_keeps_tensor_table(name: str, info: dict[str, Any]) -> None:
    original = VALID / name
    blob = original.read_bytes()
    header = read_header(original)
    new = serialize_header(header.metadata, header.tensors)
    data_region = blob[header.data_start :]
    rewritten = pack_prefix(new) + data_region
    again = parse_file_bytes(rewritten)
    assert same_tensors(again.tensors, header.tensors)
    assert metadata_equal(again.metadata, header.metadata)
    assert again.aligned and again.leading_whitespace == 0 and again.metadata_first
    assert again.duplicate_keys == ()
    assert oracle_accepts(rewritten)
    # Serializing the parsed header again gives the same bytes: the serializer is a fixed point.
    assert serialize_header(again.metadata, again.tensors) == new


def test_metadata_equal_ignores_order() -> None:
    assert metadata_equal({"a": "1", "b": "2"}, {"b": "2", "a": "1"})
    assert not metadata_equal({"a": "1", "b": "2"}, {"a": "1", "b": "3"})
    assert not metadata_equal({"a": "1"}, {"a": "1", "b": "2"})
    assert metadata_equal(None, {})
    assert not metadata_equal(None, {"a": "1"})


def test_metadata_equal_on_reference_writer_output(tmp_path: Path) -> None:
    metadata = {f"key{i}": f"value{i}" for i in range(12)}
    path = tmp_path / "many.safetensors"
    path.write_bytes(save({"t": np.ones(2, dtype=np.float32)}, metadata=metadata))
    header = read_header(path)
    assert metadata_equal(header.metadata, metadata)
    assert header.metadata is not None and set(header.metadata) == set(metadata)
    assert METADATA_KEY not in header.metadata


def test_header_properties() -> None:
    blob = build_file({"a": ("F32", [2]), "b": ("U8", [3])}, {"format": "pt"})
    header = parse_file_bytes(blob)
    assert isinstance(header, Header)
    assert header.data_start == PREFIX_SIZE + header.header_len
    assert header.file_size == len(blob)
    assert header.raw == blob[PREFIX_SIZE : header.data_start]
    assert header.json_len == header.header_len - header.padding
    assert header.tensors["a"].nbytes == 8 and header.tensors["b"].numel == 3
    assert header.warnings == ()


def test_parse_header_without_file_size_skips_only_the_length_check() -> None:
    raw = serialize_header(None, {"a": TensorInfo("F32", (2,), (0, 8))})
    assert parse_header(raw).data_len == 8
    with pytest.raises(HeaderError) as caught:
        parse_header(raw, PREFIX_SIZE + len(raw) + 7)
    assert caught.value.code == "missing-data"


# --------------------------------------------------------------------------------------------
# Files that are not regular files: a quick one-line error, never a hang


def run_read_header(path: str) -> subprocess.CompletedProcess[str]:
    """Call read_header(path) in a child process (so a hang is a timeout, not a stuck suite)."""
    code = (
        "import sys\n"
        "from patcher.header import read_header\n"
        "from patcher.errors import HeaderError\n"
        "try:\n"
        "    read_header(sys.argv[1])\n"
        "except HeaderError as e:\n"
        "    print(e.code)\n"
        "    print(e)\n"
        "else:\n"
        "    print('accepted')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, path], capture_output=True, text=True, timeout=30, cwd=ROOT, check=False
    )


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    done = run_read_header(str(fifo))  # no writer: a blocking open would hang until the timeout
    code, message = done.stdout.splitlines()
    assert code == "not-a-file"
    assert message.startswith(f"{fifo}: ")
    assert done.stderr == ""


def test_dev_zero_is_refused_without_reading_forever() -> None:
    done = run_read_header("/dev/zero")
    code, message = done.stdout.splitlines()
    assert code == "not-a-file"
    assert message.startswith("/dev/zero: ")


def test_directory_and_missing_file(tmp_path: Path) -> None:
    for path, code in ((tmp_path, "not-a-file"), (tmp_path / "missing.safetensors", "not-found")):
        with pytest.raises(HeaderError) as caught:
            read_header(path)
        assert caught.value.code == code
        text = str(caught.value)
        assert text.startswith(f"{path}: ") and "\n" not in text


def test_huge_sparse_file_needs_no_data_read(tmp_path: Path) -> None:
    # A 64 GiB tensor in a sparse file: validation must come from the header and the file size alone.
    size = 64 * 2**30
    raw = serialize_header(None, {"big": TensorInfo("U8", (size,), (0, size))})
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(pack_prefix(raw))
        f.truncate(PREFIX_SIZE + len(raw) + size)
    assert read_header(path).data_len == size
    assert oracle_accepts(path)
    with open(path, "r+b") as f:
        f.truncate(PREFIX_SIZE + len(raw) + size - 1)
    with pytest.raises(HeaderError) as caught:
        read_header(path)
    assert caught.value.code == "missing-data"
    assert not oracle_accepts(path)


def test_length_prefix_limits() -> None:
    for n, code in (
        (100_000_000, "header-past-eof"),
        (100_000_001, "header-too-large"),
        (2**64 - 1, "header-too-large"),
    ):
        with pytest.raises(HeaderError) as caught:
            parse_file_bytes(struct.pack("<Q", n) + b"{}")
        assert caught.value.code == code


def describe(mapping: Mapping[str, TensorInfo]) -> list[tuple[str, str]]:
    """Return (name, dtype) pairs, for readable assertion output."""
    return [(name, info.dtype) for name, info in mapping.items()]


def test_duplicate_name_with_bad_overridden_offsets_is_rejected() -> None:
    # The reader deserializes every entry, even one a later duplicate replaces: negative offsets fail.
    entry = '{"dtype":"U8","shape":[2],"data_offsets":[0,2]}'
    bad = '{"dtype":"U8","shape":[2],"data_offsets":[-2,0]}'
    blob = pack_prefix(("{" + f'"a":{bad},"a":{entry}' + "}").encode()) + b"xx"
    assert not oracle_accepts(blob)
    with pytest.raises(HeaderError) as caught:
        parse_file_bytes(blob)
    assert caught.value.code == "bad-offsets"
    good = pack_prefix(("{" + f'"a":{entry},"a":{entry}' + "}").encode()) + b"xx"
    assert oracle_accepts(good)
    assert describe(parse_file_bytes(good).tensors) == [("a", "U8")]


def test_parse_header_restores_the_garbage_collector() -> None:
    # parse_header pauses the cyclic collector while it builds the table; it must leave it as it found it.
    raw = serialize_header(None, {"a": TensorInfo("F32", (2,), (0, 8))})
    assert gc.isenabled()
    parse_header(raw)
    assert gc.isenabled()
    with pytest.raises(HeaderError):
        parse_header(b"{,}")
    assert gc.isenabled()
    gc.disable()
    try:
        parse_header(raw)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_shape_of_many_huge_dims_is_rejected_without_multiplying_it_out() -> None:
    # 100,000 dims of 2**64 - 1: the reader stops at the first overflow, and so must we (a full product
    # of that many 64-bit numbers takes minutes).
    dims = ",".join(["18446744073709551615"] * 100_000)
    blob = pack_prefix(('{"a":{"dtype":"U8","shape":[' + dims + '],"data_offsets":[0,0]}}').encode())
    with pytest.raises(HeaderError) as caught:
        parse_file_bytes(blob)
    assert caught.value.code == "overflow"
    assert len(str(caught.value)) < 300
    assert not oracle_accepts(blob)
