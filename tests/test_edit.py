"""Tests of patcher.edit: KEY=VALUE parsing, the edit itself, and the loader-contract refusal of set / unset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MakeSafetensors

from patcher import synth
from patcher.edit import (
    Edit,
    Editor,
    EditPlan,
    apply_edit,
    compact_json,
    parse_assignment,
    parse_assignments,
    plan_edit,
)
from patcher.errors import MetadataError, UsageError
from patcher.facts import Family
from patcher.header import Header, read_header
from patcher.metadata import COMPAT_KEYS, build_entries
from patcher.plan import MetadataPlan

CONFIGS = Path(__file__).resolve().parent.parent / "patcher" / "configs"


def flux_entries(compat: bool = False) -> dict[str, str]:
    text = (CONFIGS / "flux.1-dev.json").read_text()
    return build_entries(family=Family.FLUX, config_text=text, precision="int4", rank=32, compat_fields=compat)


def flux_header(metadata: dict[str, str] | None) -> Header:
    return synth.synth_header(synth.preset("flux.1-dev"), metadata)


# --------------------------------------------------------------------------------------------
# KEY=VALUE arguments


def test_key_value_splits_on_the_first_equals_sign() -> None:
    assert parse_assignment("modelspec.title=a=b") == parse_assignment("modelspec.title=a=b")
    item = parse_assignment("modelspec.title=a=b")
    assert (item.key, item.value, item.source) == ("modelspec.title", "a=b", None)
    assert parse_assignment("empty=").value == ""


@pytest.mark.parametrize("text", ["novalue", "=value", ""])
def test_an_argument_without_key_or_equals_sign_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="is not KEY=VALUE"):
        parse_assignment(text)


def test_at_file_reads_the_file_and_at_at_is_a_literal(tmp_path: Path) -> None:
    value_file = tmp_path / "comfy.json"
    value_file.write_text('{"model_class": "Flux"}\n', encoding="utf-8")

    item = parse_assignment(f"comfy_config=@{value_file}")
    literal = parse_assignment("handle=@@someone")

    assert (item.value, item.source) == ('{"model_class": "Flux"}\n', str(value_file))
    assert (literal.value, literal.source) == ("@someone", None)


def test_at_file_problems_are_usage_errors_naming_the_file(tmp_path: Path) -> None:
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match="value file not found") as missing:
        parse_assignment(f"k=@{tmp_path / 'nope.json'}")
    with pytest.raises(UsageError, match="not UTF-8"):
        parse_assignment(f"k=@{binary}")
    with pytest.raises(UsageError, match="names no file"):
        parse_assignment("k=@")
    assert missing.value.path == str(tmp_path / "nope.json")


def test_json_value_is_checked_and_stored_compactly_in_its_key_order() -> None:
    item = parse_assignment('comfy_config={ "b": [1, 2],\n "a": {"x": "é"} }', json_value=True)

    assert item.value == '{"b":[1,2],"a":{"x":"é"}}'
    assert compact_json(' "text" ', key="k") == '"text"'


@pytest.mark.parametrize("text", ["{not json", "NaN", '{"a": Infinity}', ""])
def test_json_value_refuses_what_is_not_json(text: str) -> None:
    with pytest.raises(UsageError, match="'k' is not valid JSON"):
        parse_assignment(f"k={text}", json_value=True)


def test_a_key_given_twice_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="given twice"):
        parse_assignments(["a=1", "b=2", "a=3"])


def test_an_edit_cannot_mix_all_with_keys_or_set_and_remove_one_key() -> None:
    with pytest.raises(UsageError, match="--all"):
        Edit(unset_keys=("a",), unset_all=True)
    with pytest.raises(UsageError, match="both set and removed"):
        Edit(set_items={"a": "1"}, unset_keys=("a",))


# --------------------------------------------------------------------------------------------
# The edit


def test_set_keeps_every_key_in_place_and_appends_new_ones() -> None:
    new, absent = apply_edit({"format": "pt", "b": "1"}, Edit(set_items={"b": "2", "modelspec.title": "T"}))
    assert list(new or {}) == ["format", "b", "modelspec.title"]
    assert new == {"format": "pt", "b": "2", "modelspec.title": "T"} and absent == ()


def test_unset_removes_keys_and_names_the_absent_ones() -> None:
    new, absent = apply_edit({"format": "pt", "b": "1"}, Edit(unset_keys=("b", "zzz")))
    assert new == {"format": "pt"} and absent == ("zzz",)


def test_removing_every_key_drops_the_metadata_entry() -> None:
    assert apply_edit({"format": "pt"}, Edit(unset_all=True)) == (None, ())
    assert apply_edit({"format": "pt"}, Edit(unset_keys=("format",))) == (None, ())
    # Nothing removed: an empty map stays as it is.
    assert apply_edit({}, Edit(unset_keys=("x",))) == ({}, ("x",))


def test_an_edit_plan_is_a_metadata_plan_with_the_diff_and_changes() -> None:
    header = synth.header_of(synth.table_to_tensors(synth.build_table(synth.preset("flux.1-dev"))))
    plan = Editor(Edit(set_items={"modelspec.title": "My model"})).plan("m.safetensors", header)

    assert isinstance(plan, MetadataPlan) and isinstance(plan, EditPlan)
    assert plan.changed and plan.new_metadata == {"modelspec.title": "My model"}
    assert [(c.key, c.kind) for c in plan.changes] == [("modelspec.title", "added")]
    assert plan.diff()[:2] == ["--- /dev/null", "+++ b/__metadata__/modelspec.title"]


def test_unset_all_plans_a_header_without_metadata() -> None:
    header = flux_header({"format": "pt"})
    plan = plan_edit("m.safetensors", header, Edit(unset_all=True))

    assert plan.new_metadata is None and plan.changed
    assert not plan_edit("m.safetensors", flux_header(None), Edit(unset_all=True)).changed


def test_a_no_op_edit_does_not_change_the_file() -> None:
    header = flux_header({"format": "pt"})
    assert not plan_edit("m", header, Edit(set_items={"format": "pt"})).changed
    assert not plan_edit("m", header, Edit(unset_keys=("absent",))).changed


# --------------------------------------------------------------------------------------------
# The loader contract


def test_dropping_compat_fields_is_not_checked_and_keeps_the_loader_keys() -> None:
    header = flux_header(flux_entries(compat=True))
    compat = [k for k in COMPAT_KEYS if k in (header.metadata or {})]
    assert "full_config" in compat

    plan = plan_edit("m", header, Edit(unset_keys=tuple(compat)))

    assert plan.new_metadata == flux_entries() and plan.verdicts == {}


def test_fixing_a_wrong_comfy_config_by_hand_is_accepted() -> None:
    good = flux_entries()
    broken = {**good, "comfy_config": "{}"}
    plan = plan_edit("m", flux_header(broken), Edit(set_items={"comfy_config": good["comfy_config"]}))

    assert plan.new_metadata == good
    assert plan.verdicts and all(v.ok for v in plan.verdicts.values())


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (Edit(set_items={"comfy_config": "{}"}), "comfyui-nunchaku would fail"),
        (Edit(set_items={"config": "{not json"}), "nunchaku would fail"),
        (Edit(unset_keys=("quantization_config",)), "nunchaku would fail"),
        (Edit(unset_all=True), "nunchaku-v2 would fail"),
    ],
)
def test_an_edit_that_breaks_a_loader_is_refused_with_its_verdict(edit: Edit, fragment: str) -> None:
    header = flux_header(flux_entries())

    with pytest.raises(MetadataError) as refused:
        plan_edit("m.safetensors", header, edit)

    assert refused.value.code == "breaks-loader"
    assert fragment in refused.value.render() and "--force" in refused.value.render()
    assert refused.value.render().startswith("m.safetensors: this edit would break a loader: ")


def test_a_wrong_value_no_loader_reads_is_written_with_a_warning() -> None:
    # No Flux loader reads model_class (ComfyUI's T5 loader does): the file still loads, the finding says it is wrong.
    plan = plan_edit("m", flux_header(flux_entries()), Edit(set_items={"model_class": "SomethingElse"}))

    assert all(v.ok for v in plan.verdicts.values())
    assert [f.code for f in plan.findings] == ["model-class-mismatch"]


def test_force_writes_the_breaking_edit_and_keeps_the_new_problems_as_findings() -> None:
    header = flux_header(flux_entries())
    plan = plan_edit("m", header, Edit(set_items={"comfy_config": "{}"}, force=True))

    assert plan.new_metadata is not None and plan.new_metadata["comfy_config"] == "{}"
    assert not plan.verdicts["comfyui-nunchaku"].ok
    assert any(f.code.startswith("comfy-config") for f in plan.findings)


def test_building_the_metadata_key_by_key_is_allowed_but_a_wrong_value_is_not() -> None:
    header = flux_header(None)  # every loader fails already: no metadata
    config = flux_entries()["config"]

    plan = plan_edit("m", header, Edit(set_items={"config": config}))
    schnell = (CONFIGS / "flux.1-schnell.json").read_text()

    assert plan.new_metadata == {"config": config}
    with pytest.raises(MetadataError, match="would reject it"):
        plan_edit("m", header, Edit(set_items={"config": schnell}))


def test_setting_all_four_keys_on_an_old_file_gives_a_loadable_file() -> None:
    entries = flux_entries()
    plan = plan_edit("m", flux_header({"format": "pt"}), Edit(set_items=entries))
    assert all(v.ok for v in plan.verdicts.values()) and plan.new_metadata == {"format": "pt", **entries}


def test_files_that_are_not_svdquant_are_never_checked(make_safetensors: MakeSafetensors) -> None:
    header = read_header(make_safetensors(metadata={"format": "pt"}))  # a few float tensors: no loader reads it
    plan = plan_edit("m", header, Edit(set_items={"config": json.dumps({"x": 1}), "model_class": "X"}))
    assert plan.verdicts == {} and plan.findings == [] and plan.changed
