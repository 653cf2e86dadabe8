"""Tests of patcher.tensors: the tensor listing, its filter, the Markdown report and the two-header diff."""

from __future__ import annotations

import json

import numpy as np
from conftest import MakeSafetensors
from safetensors import safe_open

from patcher import synth
from patcher.header import Header, TensorInfo, read_header
from patcher.inspect import describe, infer
from patcher.tensors import (
    diff_headers,
    dtype_histogram,
    human_size,
    markdown_report,
    markdown_table,
    render_header_diff,
    tensor_rows,
    tensor_table,
)


def test_rows_give_each_tensors_bytes_where_safetensors_finds_them(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors()
    header = read_header(path)
    blob = path.read_bytes()

    rows = tensor_rows(header)

    assert [r.name for r in rows] == list(header.tensors)
    with safe_open(str(path), framework="np") as handle:
        for row in rows:
            array = handle.get_tensor(row.name)
            assert (list(array.shape), array.nbytes) == (list(row.shape), row.size)
            # The offset is absolute: the tensor's bytes start there in the file.
            assert blob[row.offset : row.offset + row.size] == np.ascontiguousarray(array).tobytes()


def test_the_filter_is_a_case_sensitive_glob_and_several_globs_add_up() -> None:
    header = synth.synth_header(synth.preset("flux.1-dev", scale=0.05))

    downs = tensor_rows(header, ["*.lora_down"])
    block0 = tensor_rows(header, ["transformer_blocks.0.*", "x_embedder.*"])

    assert downs and all(r.name.endswith(".lora_down") for r in downs)
    assert len(downs) == sum(1 for n in header.tensors if n.endswith(".lora_down"))
    assert {r.name.split(".")[0] for r in block0} == {"transformer_blocks", "x_embedder"}
    assert all(r.name.startswith(("transformer_blocks.0.", "x_embedder.")) for r in block0)
    assert tensor_rows(header, ["*.LORA_DOWN"]) == []


def test_the_text_table_has_one_aligned_line_per_tensor() -> None:
    header = synth.header_of({"a.weight": TensorInfo("F16", (3, 4), (0, 24)), "b": TensorInfo("I8", (), (24, 25))})

    lines = tensor_table(tensor_rows(header))

    assert lines[0].split() == ["name", "dtype", "shape", "bytes", "offset"]
    assert lines[1].split() == ["a.weight", "F16", "[3,", "4]", "24", f"{header.data_start:,}"]
    assert lines[2].split() == ["b", "I8", "[]", "1", f"{header.data_start + 24:,}"]
    assert len({len(line) for line in lines[:2]}) == 1  # columns line up


def test_markdown_tables_escape_pipes_and_align_numbers() -> None:
    assert markdown_table(("k", "n"), [("a|b", "1")], right=(1,)) == ["| k | n |", "| --- | ---: |", "| a\\|b | 1 |"]


def test_the_markdown_report_holds_the_summary_metadata_and_tensors() -> None:
    metadata = {"format": "pt", "config": json.dumps({"b": 1, "a": [1, 2]})}
    header = synth.synth_header(synth.preset("flux.1-dev", scale=0.05), metadata)
    inference = infer(header)

    lines = markdown_report("m.safetensors", header, describe(inference), tensor_rows(header, ["x_embedder.*"]))
    text = "\n".join(lines)

    assert lines[0] == "### `m.safetensors`"
    assert f"- tensors: {len(header.tensors):,} (" in text
    assert "| dtype | tensors | size |" in text
    for dtype, (count, _size) in dtype_histogram(header).items():
        assert f"| {dtype} | {count:,} |" in text
    assert "- family: flux" in text
    block = text.split("```json\n")[1].split("\n```")[0]
    assert json.loads(block) == {"format": "pt", "config": {"b": 1, "a": [1, 2]}}
    assert "**Tensors** (2 of" in text and "| `x_embedder.weight` |" in text


def test_the_markdown_report_says_when_there_is_no_metadata() -> None:
    header = synth.synth_header(synth.preset("flux.1-dev", scale=0.05))
    text = "\n".join(markdown_report("m", header, []))
    assert "**Metadata**: none (no `__metadata__`)" in text and "**Tensors**" not in text


def test_human_sizes() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 5 * 2**20, 7 * 2**30, 3 * 2**40)] == [
        "0 B",
        "1,023 B",
        "1.0 KiB",
        "5.0 MiB",
        "7.0 GiB",
        "3072.0 GiB",
    ]


# --------------------------------------------------------------------------------------------
# Two headers


def _pair() -> tuple[Header, Header]:
    a = synth.header_of(
        {
            "keep": TensorInfo("F16", (2, 2), (0, 8)),
            "dtype": TensorInfo("F16", (4,), (8, 16)),
            "shape": TensorInfo("F32", (2,), (16, 24)),
            "gone": TensorInfo("I8", (8,), (24, 32)),
        },
        {"format": "pt", "config": '{"a": 1}'},
    )
    b = synth.header_of(
        {
            "keep": TensorInfo("F16", (2, 2), (0, 8)),
            "dtype": TensorInfo("BF16", (4,), (8, 16)),
            "shape": TensorInfo("F32", (1, 2), (16, 24)),
            "new": TensorInfo("I8", (8,), (24, 32)),
        },
        {"format": "pt", "config": '{"a": 2}', "model_class": "X"},
    )
    return a, b


def test_the_diff_names_metadata_keys_tensors_only_in_one_and_changed_dtype_or_shape() -> None:
    a, b = _pair()

    diff = diff_headers(a, b)

    assert [(c.key, c.kind) for c in diff.metadata] == [("config", "changed"), ("model_class", "added")]
    assert '-  "a": 1' in diff.metadata_diff and '+  "a": 2' in diff.metadata_diff
    assert (diff.only_in_a, diff.only_in_b, diff.same) == (("gone",), ("new",), 1)
    assert [(d.name, d.a.dtype, d.b.dtype, d.a.shape, d.b.shape) for d in diff.different] == [
        ("dtype", "F16", "BF16", (4,), (4,)),
        ("shape", "F32", "F32", (2,), (1, 2)),
    ]
    record = diff.to_json()
    assert record["identical"] is False and record["only_in_b"] == ["new"]
    assert record["different"][1] == {
        "name": "shape",
        "a": {"dtype": "F32", "shape": [2]},
        "b": {"dtype": "F32", "shape": [1, 2]},
    }


def test_the_diff_text_names_both_files_and_every_difference() -> None:
    a, b = _pair()

    lines = render_header_diff(diff_headers(a, b), "old.safetensors", "new.safetensors")

    assert lines[0] == "metadata: 2 key(s) differ: config (changed), model_class (added)"
    assert "tensors only in old.safetensors (1):" in lines and "  gone" in lines
    assert "tensors only in new.safetensors (1):" in lines and "  new" in lines
    assert "  dtype: F16 [4] -> BF16 [4]" in lines and "  shape: F32 [2] -> F32 [1, 2]" in lines
    assert lines[-1] == "tensors the same in both: 1"


def test_a_file_against_itself_is_identical_and_long_lists_are_cut() -> None:
    header = synth.synth_header(synth.preset("flux.1-dev", scale=0.05))
    other = synth.header_of({"x": TensorInfo("F16", (1,), (0, 2))})

    assert diff_headers(header, header).identical
    assert render_header_diff(diff_headers(header, header), "a", "a")[0].startswith("same metadata and tensors")
    lines = render_header_diff(diff_headers(header, other), "a", "b", limit=3)
    assert f"  ... and {len(header.tensors) - 3:,} more" in lines
