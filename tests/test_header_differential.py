"""Differential fuzzing: ``patcher.header`` accepts exactly the files ``safetensors.safe_open`` accepts.

Two generators feed the same assertion, ``accepted_by(parse_file_bytes) == oracle_accepts(file)``:

(a) headers built from a model (tensor table, metadata, JSON formatting, data length), valid by
    construction and then optionally broken by one to three perturbations aimed at the format's rules;
(b) byte-level mutations (flip, insert, delete, prefix changes, truncate, extend) of valid files;
(c) numbers near f64's maximum in an ignored entry field, where serde_json's float parsing (not
    correctly rounded) and Python's part ways.

A clean model must be accepted by both, which keeps generator (a) honest. Every case is also parsed
with the fast paths switched off (the plain-layout scan, then the bulk table check): the JSON decoder and
the precise per-entry checks must give the same table or error.
``NPATCH_FUZZ_EXAMPLES`` raises the number of examples per property (default 300) for a longer run.

Deliberate differences from the reference reader: none. On every input both accept or both reject.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from oracle import oracle_accepts

from patcher import header as header_module
from patcher.errors import HeaderError
from patcher.header import DTYPE_BITS, METADATA_KEY, PREFIX_SIZE, parse_file_bytes

EXAMPLES = int(os.environ.get("NPATCH_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
VALID_FIXTURES = sorted((Path(__file__).resolve().parent / "fixtures" / "valid").glob("*.safetensors"))
DTYPES = sorted(DTYPE_BITS)
BOGUS_DTYPES = ["f32", "bf16", "F128", "", "F32 ", "float32", "I4", "F8_E4M3FN", "Bool", "U128"]
WHITESPACE = ["", "", " ", "\n", "\t", "\r\n", "  "]
U64_MAX = 2**64 - 1


def accepted_by(parse: Callable[[bytes], object], blob: bytes) -> bool:
    """Return whether ``parse`` accepts ``blob`` (a HeaderError means no; anything else is a bug)."""
    try:
        parse(blob)
    except HeaderError as error:
        note(f"ours: {error.code}: {error}")
        return False
    return True


def outcome(blob: bytes) -> tuple[Any, ...]:
    """Return everything parse_file_bytes says about ``blob``: the parsed table, or the error code."""
    try:
        header = parse_file_bytes(blob)
    except HeaderError as error:
        return ("rejected", error.code)
    metadata = dict(header.metadata) if header.metadata is not None else None
    return ("accepted", list(header.tensors.items()), metadata, header.data_len, header.duplicate_keys)


def check_agreement(blob: bytes) -> bool:
    """Assert both readers agree on ``blob``; return the verdict."""
    note(f"file ({len(blob)} bytes): {blob[:400]!r}")
    ours = accepted_by(parse_file_bytes, blob)
    reference = oracle_accepts(blob)
    assert ours == reference, f"patcher.header {'accepts' if ours else 'rejects'}, safetensors does not"
    # The fast paths are only shortcuts: without them (no plain-layout scan, no bulk table check), the JSON
    # decoder and the precise per-entry checks must say the same.
    fast = outcome(blob)
    with mock.patch.object(header_module, "_scan_plain", return_value=None):
        assert outcome(blob) == fast, "the plain-layout scan and the JSON decoder path disagree"
        with mock.patch.object(header_module, "_fast_table", return_value=None):
            precise = outcome(blob)
    assert fast == precise, "the fast paths and the precise checks disagree"
    if ours:
        check_rewrites(blob)
    return ours


def check_rewrites(blob: bytes) -> None:
    """What a patch writes for an accepted file: the same bytes either way, and proven only when it is sound.

    ``reserialize`` (which keeps a writer-layout file's tensor entries byte for byte) must equal the entry by
    entry serializer; where ``shares_tensor_table`` vouches for the new header without parsing it, the strict
    reader and safetensors must both accept the patched file, with the old table and the new metadata.
    """
    old = parse_file_bytes(blob)
    for metadata in (None, {}, {"config": '{"a": 1}', "é": "✓"}):
        compact = header_module.reserialize(old, metadata)
        assert compact == header_module.serialize_header(metadata, old.tensors).rstrip(b" ")
        new = compact + b" " * (-(PREFIX_SIZE + len(compact)) % 8)
        if header_module.shares_tensor_table(old, new, metadata):
            patched = header_module.pack_prefix(new) + blob[old.data_start :]
            parsed = parse_file_bytes(patched)
            assert list(parsed.tensors.items()) == list(old.tensors.items())
            assert (dict(parsed.metadata) if parsed.metadata is not None else None) == metadata
            assert oracle_accepts(patched), "a header vouched for without a parse is refused by safetensors"
        else:
            assert old.tensors_at is None, "a writer-layout header's own rewrite was not recognised"


# --------------------------------------------------------------------------------------------
# A tiny JSON model and renderer: enough control to write what json.dumps never would


@dataclass
class Lit:
    """JSON text written as is (NaN, -0, 1e400, a 400-digit integer, broken syntax)."""

    text: str


@dataclass
class Obj:
    """A JSON object as its pairs, so duplicate keys and any order can be written.

    With ``sequence`` set it is written as the array of its values: serde reads a struct (a tensor entry)
    from a sequence of its fields in declaration order.
    """

    pairs: list[tuple[str, Any]]
    sequence: bool = False


@dataclass
class Style:
    """Formatting decisions for one header."""

    escape: str = "raw"  # raw | ascii | upper | all
    spaces: list[str] = field(default_factory=lambda: [""])
    turn: int = 0

    def ws(self) -> str:
        """Return the next whitespace run."""
        self.turn += 1
        return self.spaces[self.turn % len(self.spaces)]


SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def escape_char(ch: str, upper: bool) -> str:
    """Return the \\u escape(s) of one character (a surrogate pair past the BMP)."""
    code = ord(ch)
    units = [code] if code < 0x10000 else [0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)]
    return "".join(f"\\u{unit:04X}" if upper else f"\\u{unit:04x}" for unit in units)


def render_string(text: str, style: Style) -> str:
    """Return a JSON string literal; lone surrogates in ``text`` become \\u escapes."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            out.append(escape_char(ch, style.escape == "upper"))
        elif style.escape == "all":
            out.append(escape_char(ch, False))
        elif ch in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[ch])
        elif code < 0x20 or (code > 0x7E and style.escape in ("ascii", "upper")):
            out.append(escape_char(ch, style.escape == "upper"))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def render(node: Any, style: Style) -> str:
    """Return the JSON text of a model node."""
    if isinstance(node, Lit):
        return node.text
    if isinstance(node, str):
        return render_string(node, style)
    if node is None:
        return "null"
    if isinstance(node, bool):
        return "true" if node else "false"
    if isinstance(node, (int, float)):
        return json.dumps(node)
    if isinstance(node, list):
        return "[" + ",".join(style.ws() + render(item, style) + style.ws() for item in node) + "]"
    if isinstance(node, Obj) and node.sequence:
        return render([value for _, value in node.pairs], style)
    if isinstance(node, Obj):
        parts = [
            style.ws() + render_string(key, style) + style.ws() + ":" + style.ws() + render(value, style) + style.ws()
            for key, value in node.pairs
        ]
        return "{" + ",".join(parts) + "}"
    raise TypeError(f"not a model node: {node!r}")


@dataclass
class Model:
    """A whole file before rendering: metadata, tensor entries, formatting and data length."""

    tensors: list[tuple[str, Obj]]
    metadata: Any  # absent (the sentinel ABSENT), None, or an Obj
    metadata_index: int
    style: Style
    lead: str
    trail: str
    data_len: int
    garbage: str = ""  # bytes after the object, broken on purpose

    def to_bytes(self) -> bytes:
        """Render the model into a complete file."""
        pairs: list[tuple[str, Any]] = list(self.tensors)
        if self.metadata is not ABSENT:
            pairs.insert(min(self.metadata_index, len(pairs)), (METADATA_KEY, self.metadata))
        text = self.lead + render(Obj(pairs), self.style) + self.garbage + self.trail
        raw = text.encode("utf-8", "surrogatepass")
        raw += b" " * (-(PREFIX_SIZE + len(raw)) % 8)
        return struct.pack("<Q", len(raw)) + raw + bytes(max(self.data_len, 0))


ABSENT = Lit("<absent>")

# Values an unknown entry field may hold: anything JSON, ignored by the reader.
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=6),
        st.sampled_from([Lit("-0"), Lit("1e300"), Lit("-0.0"), Lit("9" * 30), Lit("1E-400")]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(st.tuples(st.text(max_size=4), children), max_size=3).map(Obj),
    ),
    max_leaves=8,
)


def whole_shape(draw: st.DrawFn, dtype: str) -> list[int]:
    """Draw a small shape whose tensor fills whole bytes."""
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    if (math.prod(shape) * DTYPE_BITS[dtype]) % 8:
        shape.append(4)  # F4 and F6 need 2 and 4 elements per byte boundary
    return shape


@st.composite
def clean_models(draw: st.DrawFn) -> Model:
    """Draw a model that the reference reader accepts."""
    count = draw(st.integers(0, 5))
    names = draw(st.lists(st.text(max_size=8), min_size=count, max_size=count, unique=True))
    names = [name for name in names if name != METADATA_KEY]
    specs = []
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        specs.append((name, dtype, whole_shape(draw, dtype)))
    # Data order differs from header order: the reader sorts by offsets.
    order = draw(st.permutations(range(len(specs))))
    offsets: dict[int, tuple[int, int]] = {}
    position = 0
    for index in order:
        _, dtype, shape = specs[index]
        size = math.prod(shape) * DTYPE_BITS[dtype] // 8
        offsets[index] = (position, position + size)
        position += size
    tensors: list[tuple[str, Obj]] = []
    for index, (name, dtype, shape) in enumerate(specs):
        # serde also reads a dtype as an externally tagged unit variant: {"F32": null}.
        dtype_node: Any = Obj([(dtype, None)]) if draw(st.integers(0, 4)) == 0 else dtype
        fields: list[tuple[str, Any]] = [
            ("dtype", dtype_node),
            ("shape", shape),
            ("data_offsets", list(offsets[index])),
        ]
        # ... and a whole entry as the sequence [dtype, shape, data_offsets] (no room for other fields).
        sequence = draw(st.integers(0, 4)) == 0
        if not sequence and draw(st.booleans()):
            fields = draw(st.permutations(fields))
        for _ in range(0 if sequence else draw(st.integers(0, 2))):
            key = draw(st.text(max_size=5).filter(lambda k: k not in ("dtype", "shape", "data_offsets")))
            fields.insert(draw(st.integers(0, len(fields))), (key, draw(json_values)))
        if draw(st.integers(0, 9)) == 0:
            # An earlier entry with the same name is overridden: it only has to be well-typed.
            stale = Obj([("dtype", draw(st.sampled_from(DTYPES))), ("shape", [7]), ("data_offsets", [3, 1])])
            tensors.append((name, stale))
        tensors.append((name, Obj(fields, sequence=sequence)))
    metadata_kind = draw(st.sampled_from(["absent", "null", "object"]))
    metadata: Any = ABSENT if metadata_kind == "absent" else None
    if metadata_kind == "object":
        entries = draw(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=12)), max_size=4))
        metadata = Obj(list(entries))
    style = Style(
        escape=draw(st.sampled_from(["raw", "raw", "ascii", "upper", "all"])),
        spaces=draw(st.lists(st.sampled_from(WHITESPACE), min_size=1, max_size=6)),
    )
    return Model(
        tensors=tensors,
        metadata=metadata,
        metadata_index=draw(st.integers(0, len(tensors))),
        style=style,
        lead=draw(st.sampled_from(["", "", " ", "\n", "\t \r\n"])),
        trail=draw(st.sampled_from(["", "", " ", "\t\n", "\r\n\t "])),
        data_len=position,
    )


# --------------------------------------------------------------------------------------------
# Perturbations: each breaks (or tries to break) one rule


def pick_entry(draw: st.DrawFn, model: Model) -> Obj | None:
    """Return one tensor entry of the model, or None if it has none."""
    if not model.tensors:
        return None
    return model.tensors[draw(st.integers(0, len(model.tensors) - 1))][1]


def set_field(entry: Obj, key: str, value: Any) -> None:
    """Replace every ``key`` field of an entry (or add one)."""
    found = False
    for index, (name, _) in enumerate(entry.pairs):
        if name == key:
            entry.pairs[index] = (key, value)
            found = True
    if not found:
        entry.pairs.append((key, value))


def get_field(entry: Obj, key: str) -> Any:
    """Return the last ``key`` field of an entry, or None."""
    values = [value for name, value in entry.pairs if name == key]
    return values[-1] if values else None


BAD_DIMS = [-1, -(2**63), 2**32, 2**40, 2**63, U64_MAX, 2**64, 2**70, True, False, 1.0, 0.5, "2", None, Lit("-0")]
BAD_NUMBERS = [Lit("NaN"), Lit("Infinity"), Lit("-Infinity"), Lit("1e400"), Lit("-1e309"), Lit("9" * 400), Lit("0x10")]


def perturb(draw: st.DrawFn, model: Model) -> str:
    """Apply one perturbation to ``model``; return its name (for the failure report)."""
    kind = draw(
        st.sampled_from(
            [
                "dtype",
                "dim",
                "shape",
                "offsets",
                "shift",
                "data-len",
                "metadata-value",
                "metadata-type",
                "metadata-duplicate",
                "surrogate",
                "duplicate-field",
                "missing-field",
                "bad-number",
                "deep",
                "overflow",
                "garbage",
                "control",
                "stale-duplicate",
                "tagged-dtype",
                "sequence",
            ]
        )
    )
    entry = pick_entry(draw, model)
    if kind == "dtype" and entry is not None:
        set_field(entry, "dtype", draw(st.sampled_from([*BOGUS_DTYPES, 5, None, ["F32"], True])))
    elif kind == "dim" and entry is not None:
        shape = get_field(entry, "shape")
        if isinstance(shape, list):
            shape = list(shape)
            shape.insert(draw(st.integers(0, len(shape))), draw(st.sampled_from(BAD_DIMS)))
            set_field(entry, "shape", shape)
    elif kind == "shape" and entry is not None:
        set_field(entry, "shape", draw(st.sampled_from([4, None, "[2]", Obj([]), Obj([("0", 2)]), [[2]]])))
    elif kind == "offsets" and entry is not None:
        offsets = get_field(entry, "data_offsets")
        begin, end = offsets if isinstance(offsets, list) and len(offsets) == 2 else (0, 0)
        set_field(
            entry,
            "data_offsets",
            draw(
                st.sampled_from(
                    [[begin], [begin, end, end], [end, begin], [-1, end], [begin, float(end)], [begin, True], []]
                )
            ),
        )
    elif kind == "shift" and entry is not None:
        offsets = get_field(entry, "data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2:
            delta = draw(st.sampled_from([-8, -2, -1, 1, 2, 8]))
            which = draw(st.sampled_from([0, 1, 2]))
            shifted = [offsets[0] + (delta if which != 1 else 0), offsets[1] + (delta if which != 0 else 0)]
            set_field(entry, "data_offsets", shifted)
    elif kind == "data-len":
        model.data_len += draw(st.sampled_from([-16, -1, 1, 7, 16]))
    elif kind == "metadata-value":
        value = draw(st.sampled_from([None, 1, -0.5, True, ["v"], Obj([("k", "v")]), Lit("-0")]))
        pairs = model.metadata.pairs if isinstance(model.metadata, Obj) else []
        pairs.insert(draw(st.integers(0, len(pairs))), (draw(st.text(max_size=4)), value))
        model.metadata = Obj(pairs)
    elif kind == "metadata-type":
        model.metadata = draw(st.sampled_from(["pt", 1, True, [], ["a", "b"], Lit("{}")]))
    elif kind == "metadata-duplicate":
        model.tensors.insert(
            draw(st.integers(0, len(model.tensors))), (METADATA_KEY, draw(st.sampled_from([None, Obj([])])))
        )
        if model.metadata is ABSENT and draw(st.booleans()):
            model.metadata = None
    elif kind == "surrogate":
        lone = draw(st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]))
        target = draw(st.sampled_from(["name", "metadata", "extra", "dtype"]))
        if target == "name" and model.tensors:
            name, obj = model.tensors[0]
            model.tensors[0] = (name + lone, obj)
        elif target == "metadata":
            pairs = model.metadata.pairs if isinstance(model.metadata, Obj) else []
            pairs.append(("k", "a" + lone) if draw(st.booleans()) else (lone + "k", "v"))
            model.metadata = Obj(pairs)
        elif target == "extra" and entry is not None:
            entry.pairs.append(("x", [lone]) if draw(st.booleans()) else (lone, 1))
        elif entry is not None:
            set_field(entry, "dtype", "F32" + lone)
    elif kind == "duplicate-field" and entry is not None and entry.pairs:
        key, value = entry.pairs[draw(st.integers(0, len(entry.pairs) - 1))]
        entry.pairs.append((key, value))
    elif kind == "missing-field" and entry is not None:
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entry.pairs = [(name, value) for name, value in entry.pairs if name != key]
    elif kind == "bad-number" and entry is not None:
        entry.pairs.append(("x", draw(st.sampled_from(BAD_NUMBERS))))
    elif kind == "deep" and entry is not None:
        depth = draw(st.integers(123, 129))
        entry.pairs.append(("x", Lit("[" * depth + "]" * depth)))
    elif kind == "overflow" and entry is not None:
        set_field(entry, "dtype", draw(st.sampled_from(["U8", "F32", "F4"])))
        set_field(entry, "shape", draw(st.sampled_from([[2**40, 2**40, 0], [2**32, 2**32 - 1, 0], [2**59], [2**61]])))
    elif kind == "garbage":
        model.garbage = draw(st.sampled_from([",", "}", "\x00", "x", "{}", "\x0c", "\x0b", "\u00a0", "//"]))
    elif kind == "control":
        model.lead = draw(st.sampled_from(["\ufeff", "\x00", "\x0c", "[", ""]))
        if entry is not None:
            entry.pairs.append(("x", Lit('"a' + draw(st.sampled_from(["\x01", "\x1f", "\x7f", "\n"])) + 'b"')))
    elif kind == "stale-duplicate" and model.tensors:
        name, _ = model.tensors[-1]
        bad = draw(st.sampled_from([[-2, 0], [0], [0, 2**64]]))
        model.tensors.insert(0, (name, Obj([("dtype", "U8"), ("shape", [2]), ("data_offsets", bad)])))
    elif kind == "tagged-dtype" and entry is not None:
        good = draw(st.sampled_from(DTYPES))
        set_field(
            entry,
            "dtype",
            draw(
                st.sampled_from(
                    [
                        Obj([(good, None)]),
                        Obj([(good, 1)]),
                        Obj([(good, Obj([]))]),
                        Obj([(good, [])]),
                        Obj([(good, "")]),
                        Obj([]),
                        Obj([(good, None), (good, None)]),
                        Obj([(good, None), ("F16", None)]),
                        Obj([(good.lower(), None)]),
                        Obj([("F32" + "\ud800", None)]),
                        Obj([(good, Obj([(good, None)]))]),
                    ]
                )
            ),
        )
    elif kind == "sequence" and entry is not None:
        # Any entry (extra, missing, reordered or duplicate fields included) written as a sequence.
        entry.sequence = not entry.sequence
        if draw(st.booleans()):
            entry.pairs = draw(st.permutations(entry.pairs))
    return kind


@st.composite
def perturbed_models(draw: st.DrawFn) -> tuple[Model, list[str]]:
    """Draw a clean model, then break it in one to three ways."""
    model = draw(clean_models())
    kinds = [perturb(draw, model) for _ in range(draw(st.integers(1, 3)))]
    return model, kinds


@given(clean_models())
@FUZZ
def test_clean_headers_are_valid_for_both(model: Model) -> None:
    blob = model.to_bytes()
    assert check_agreement(blob), "a clean model must be a valid file"


@given(perturbed_models())
@FUZZ
def test_generated_headers_agree(case: tuple[Model, list[str]]) -> None:
    model, kinds = case
    note(f"perturbations: {kinds}")
    check_agreement(model.to_bytes())


# serde_json reads non-integers as significand * 10**exponent in f64 (not correctly rounded): numbers near
# f64's maximum are where a decoder that rounds correctly (Python's) and serde_json part ways.
digit_strings = st.text(alphabet="0123456789", min_size=1, max_size=24)
F64_MAX_DIGITS = str(int(sys.float_info.max))  # 309 digits
around_max = st.integers(-(10**293), 10**293).map(lambda k: str(int(F64_MAX_DIGITS) + k))
near_max_numbers = st.one_of(
    around_max,
    st.builds(lambda s, n: f"{s[0]}.{s[1:n]}e308", around_max, st.integers(14, 30)),
    st.builds(lambda s, n: f"{s[:n]}e{309 - n}", around_max, st.integers(14, 30)),
    st.builds(lambda d, e: f"1.{d}e{e}", digit_strings, st.integers(306, 309)),
    st.builds(lambda d: "17976931348623" + d + "e" + str(308 - len(d) - 13), digit_strings),
    st.builds(lambda d: "17976931348623" + d.ljust(295, "0"), digit_strings),
    st.builds(lambda d, f, e: f"18446744073709551{d}.{f}e{e}", digit_strings, digit_strings, st.integers(270, 292)),
    st.builds(lambda m, e: f"{m}e{e}", st.integers(1, U64_MAX), st.integers(285, 292)),
    st.builds(lambda m, e: f"0.{m}e{e}", digit_strings, st.integers(300, 340)),
    st.builds(lambda m, e: f"{m}e{e}", digit_strings, st.sampled_from([2**31 - 1, 2**31, 2**32, 10**12])),
    st.builds(lambda m, e: f"{m}e-{e}", digit_strings, st.sampled_from([2**31 - 1, 2**31, 10**12])),
)


@given(near_max_numbers, st.booleans())
@FUZZ
def test_numbers_near_f64_max_agree(number: str, negative: bool) -> None:
    text = '{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":' + ("-" if negative else "") + number + "}}"
    raw = text.encode()
    check_agreement(struct.pack("<Q", len(raw)) + raw)


# --------------------------------------------------------------------------------------------
# (b) Byte-level mutations of valid files

INTERESTING = b'{}[]",:\\ \t\n\r0123456789-.eE\x00\x7f\x80\xbf\xc3\xed\xef\xf0\xffuU'


@st.composite
def base_files(draw: st.DrawFn) -> bytes:
    """Draw a valid file: a committed fixture or a freshly generated one."""
    if VALID_FIXTURES and draw(st.booleans()):
        return draw(st.sampled_from(VALID_FIXTURES)).read_bytes()
    return draw(clean_models()).to_bytes()


def mutate(draw: st.DrawFn, blob: bytes) -> tuple[bytes, str]:
    """Apply one byte-level mutation; return the new bytes and its name."""
    n = struct.unpack("<Q", blob[:PREFIX_SIZE])[0] if len(blob) >= PREFIX_SIZE else 0
    header_end = min(PREFIX_SIZE + n, len(blob))
    data = bytearray(blob)
    kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "prefix", "truncate", "extend"]))
    if kind in ("flip", "set", "insert", "delete") and header_end > PREFIX_SIZE:
        position = draw(st.integers(PREFIX_SIZE, header_end - 1))
        keep_n = draw(st.booleans())  # adjust N so the prefix still frames the edited header
        if kind == "flip":
            data[position] ^= draw(st.integers(1, 255))
        elif kind == "set":
            data[position] = draw(st.sampled_from(INTERESTING))
        elif kind == "insert":
            chunk = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(INTERESTING).map(lambda b: bytes([b])))
            data[position:position] = chunk
            if keep_n:
                data[:PREFIX_SIZE] = struct.pack("<Q", min(n + len(chunk), U64_MAX))
        else:
            length = draw(st.integers(1, min(8, header_end - position)))
            del data[position : position + length]
            if keep_n:
                data[:PREFIX_SIZE] = struct.pack("<Q", max(n - length, 0))
    elif kind == "prefix" and len(data) >= PREFIX_SIZE:
        new_n = draw(
            st.sampled_from([n - 1, n + 1, n - 8, n + 8, 0, 1, 100_000_000, 100_000_001, 2**63, U64_MAX])
            | st.integers(0, U64_MAX)
        )
        data[:PREFIX_SIZE] = struct.pack("<Q", max(0, min(new_n, U64_MAX)))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data))) :]
    else:
        data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data), kind


@given(st.data())
@FUZZ
def test_mutated_files_agree(data: st.DataObject) -> None:
    blob = data.draw(base_files())
    kinds = []
    for _ in range(data.draw(st.integers(1, 3))):
        blob, kind = mutate(data.draw, blob)
        kinds.append(kind)
    note(f"mutations: {kinds}")
    check_agreement(blob)
