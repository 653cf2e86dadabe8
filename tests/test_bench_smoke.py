"""Smoke test of scripts/bench.py: one --quick run reports every row and leaves the tensor bytes untouched.

No timing is asserted: only that every measurement exists and is a positive number, and that the files the
benchmark patched over and over still hold exactly the bytes they were built with.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from patcher import _platform as plat
from patcher import synth
from patcher.header import read_header

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"
#: Every row of the main table, with the write strategy its samples must report (None: not a patch).
ROWS = {
    "floor-pass": None,
    "floor-click": None,
    "cli-insert": "insert",
    "cli-fit": "fit",
    "cli-output": "output",
    "cli-merge": "merge",
    "api-copy": "copy",
    "api-insert": "insert",
    "api-fit": "fit",
    "api-insert-preloaded": "insert",
    "api-fit-preloaded": "fit",
    "cp": None,
    "cp-sync": None,
    "resave": None,
}
#: Rows measured with cold caches inside a warm run, when the page cache can be dropped (root).
COLD_ROWS = {"cli-insert-cold": "insert", "cp-cold": None}
QUICK_ROUNDS = 2

pytestmark = pytest.mark.skipif(
    not plat.insert_range_likely(tempfile.gettempdir()),
    reason="the benchmark's growth path needs fallocate insert-range (Linux, ext4 or XFS)",
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], str]]:
    """Run the benchmark once in --quick mode, keeping its files; yield the JSON results and the printed table."""
    base = tmp_path_factory.mktemp("bench")
    out = base / "results.json"
    argv = [sys.executable, str(BENCH), "--quick", "--keep", "--dir", str(base), "--json", str(out)]
    if importlib.util.find_spec("matplotlib") is not None:  # the optional `bench` extra
        argv += ["--plot", str(base / "bench.svg")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    try:
        yield results, done.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _positive_summary(summary: dict[str, float]) -> None:
    assert summary["min"] > 0
    assert summary["min"] <= summary["median"] <= summary["max"]


def test_every_row_has_positive_numbers(quick: tuple[dict[str, Any], str]) -> None:
    results, _ = quick
    rows = {row["id"]: row for row in results["rows"]}
    expected = dict(ROWS)
    if set(COLD_ROWS) & set(rows):
        expected.update(COLD_ROWS)
    assert set(rows) == set(expected)
    for row_id, strategy in expected.items():
        row = rows[row_id]
        assert len(row["samples"]) == QUICK_ROUNDS, row_id
        _positive_summary(row["seconds"])
        _positive_summary(row["rss_mib"])
        for sample in row["samples"]:
            assert sample["seconds"] > 0 and sample["wall"] > 0 and sample["maxrss_kib"] > 0, row_id
            assert sample.get("strategy") == strategy, row_id
            if row_id.startswith("api-") and row_id != "api-copy":
                # The splice alone is timed inside the child, so it cannot exceed the child's lifetime.
                assert sample["seconds"] < sample["wall"], row_id


def test_scaling_sections_are_complete(quick: tuple[dict[str, Any], str]) -> None:
    results, _ = quick
    counts = [row["tensors"] for row in results["parse_scaling"]]
    assert counts == [100, 1_000, 2_604, 10_000, 20_000]
    for row in results["parse_scaling"]:
        assert 0 < row["best_s"] <= row["median_s"]
        assert row["plan_best_s"] > 0
        assert row["repeats"] >= 3 and row["header_bytes"] > 0
    sizes = {row["size_gb"]: row for row in results["size_scaling"]}
    assert set(sizes) == {1, 7}
    for size, row in sizes.items():
        assert row["file_bytes"] >= size * 10**9 * 0.95
        _positive_summary(row["api_insert_s"])
        _positive_summary(row["cli_insert_s"])
        _positive_summary(row["cli_rss_mib"])
    batch = results["batch"]
    assert batch["files"] > 0 and batch["per_file_s"] > 0
    _positive_summary(batch["seconds"])
    large = results["large_header"]
    assert large["tensors"] == 20_000 and large["header_bytes"] > 2 * 10**6
    _positive_summary(large["seconds"])
    _positive_summary(large["rss_mib"])
    point = results["copy_points"]
    assert point["file_bytes"] > 0
    _positive_summary(point["cp_s"])
    _positive_summary(point["resave_s"])


def test_targets_carry_measurements(quick: tuple[dict[str, Any], str]) -> None:
    results, _ = quick
    names = " | ".join(item["target"] for item in results["targets"])
    for wanted in ('import click"', "batch of", "parse + plan per tensor", "20,000-tensor header", "cp + sync"):
        assert wanted in names
    for item in results["targets"]:
        assert item["measured"] is not None and item["measured"] > 0, item["target"]
        assert isinstance(item["passed"], bool), item["target"]


def test_picture_is_drawn_from_the_run(quick: tuple[dict[str, Any], str]) -> None:
    pytest.importorskip("matplotlib")
    results, _ = quick
    picture = Path(results["config"]["work"]).parent / "bench.svg"
    text = picture.read_text(encoding="utf-8")
    assert text.lstrip().startswith(("<?xml", "<svg")) and "</svg>" in text
    for label in ("nunchaku-patch FILE", "cp FILE COPY", "load all tensors + save_file"):
        assert label in text


def test_markdown_table_lists_every_row(quick: tuple[dict[str, Any], str]) -> None:
    results, printed = quick
    assert "| Method | Timed | Median |" in printed
    for row in results["rows"]:
        assert f"| {row['label']} |" in printed
    assert "Caches: warm" in printed or "Caches: cold" in printed


def _data_region(path: Path) -> bytes:
    header = read_header(path)
    with open(path, "rb") as f:
        f.seek(header.data_start)
        return f.read()


def test_patches_left_the_tensor_bytes_intact(quick: tuple[dict[str, Any], str], tmp_path: Path) -> None:
    results, _ = quick
    config = results["config"]
    assert all(item["intact"] for item in results["integrity"].values())
    # Rebuild the file the benchmark started from and compare its tensor bytes with what is left after
    # every insert, fit and copy the benchmark ran (independently of the benchmark's own hashes).
    tensors = synth.table_to_tensors(synth.build_table(synth.preset(config["model"], scale=config["scale"])))
    original = synth.write_random(tmp_path / "original.safetensors", tensors, seed=config["seed"])
    expected = _data_region(original)
    assert len(expected) == config["data_bytes"]
    work = Path(config["work"])
    bench_file = work / "svdq-int4_r32-flux.1-dev.safetensors"
    copy_file = work / "copy-path.safetensors"
    for path in (bench_file, copy_file):
        assert _data_region(path) == expected, path.name
        with safe_open(str(path), framework="np") as handle:
            assert list(handle.keys()) == sorted(tensors)
    # The bench file is left patched by the CLI: the reference reader sees Nunchaku's metadata.
    with safe_open(str(bench_file), framework="np") as handle:
        metadata = handle.metadata()
    assert metadata is not None and metadata.get("model_class") == "NunchakuFluxTransformer2dModel"
