"""Pure safetensors header parsing, validation and serialization.

The rules are those of the reference reader (huggingface/safetensors ``tensor.rs``, release 0.8):
the accept/reject decision of :func:`parse_header` agrees with ``safetensors.safe_open``, and the
tests check that differentially. Nothing here touches a file except :func:`read_header`, a thin
wrapper that reads the length prefix and the header bytes, never the data region.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
import re
import reprlib
import stat
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import field
from functools import partial
from itertools import chain, repeat
from operator import itemgetter, le, mul, sub
from types import MappingProxyType
from typing import Any, NamedTuple

from ._record import dataclass
from .errors import HeaderError, MetadataError

#: Size of the little-endian u64 that starts every file (``N_LEN`` in tensor.rs).
PREFIX_SIZE = 8
#: Largest header the reference reader accepts (``MAX_HEADER_SIZE`` in tensor.rs), in bytes.
MAX_HEADER_LEN = 100_000_000
#: The reference writer pads the header so the data region starts on this boundary.
ALIGNMENT = 8
#: The reserved top-level key holding the string-to-string metadata map.
METADATA_KEY = "__metadata__"
#: Fields of a tensor entry the reference reader deserializes; others are ignored (and kept by us).
TENSOR_FIELDS = ("dtype", "shape", "data_offsets")
#: serde_json's default recursion limit: the 128th nested array/object (top level counted) is rejected.
MAX_JSON_DEPTH = 128
#: JSON's whitespace: the only bytes allowed around the top-level object (RFC 8259).
JSON_WHITESPACE = " \t\n\r"

_U64_MAX = 2**64 - 1

#: Bits per element of every dtype the reference reader knows (case-sensitive names, tensor.rs ``Dtype``).
DTYPE_BITS: Mapping[str, int] = MappingProxyType(
    {
        "BOOL": 8,
        "F4": 4,
        "F6_E2M3": 6,
        "F6_E3M2": 6,
        "U8": 8,
        "I8": 8,
        "F8_E5M2": 8,
        "F8_E4M3": 8,
        "F8_E8M0": 8,
        "F8_E4M3FNUZ": 8,
        "F8_E5M2FNUZ": 8,
        "I16": 16,
        "U16": 16,
        "F16": 16,
        "BF16": 16,
        "I32": 32,
        "U32": 32,
        "F32": 32,
        "C64": 64,
        "F64": 64,
        "I64": 64,
        "U64": 64,
    }
)


class TensorInfo(NamedTuple):
    """One tensor entry: dtype, shape and byte range relative to the data region (immutable)."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]
    #: Entry fields the reader ignores, kept in their original order so a rewrite preserves them.
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def nbytes(self) -> int:
        """Return the length of the tensor's bytes in the data region."""
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def numel(self) -> int:
        """Return the number of elements."""
        return math.prod(self.shape)

    def to_json_obj(self) -> dict[str, Any]:
        """Return the entry as it is serialized: known fields first, then the extras."""
        obj: dict[str, Any] = {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "data_offsets": list(self.data_offsets),
        }
        obj.update(self.extra)
        return obj


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header (a value: no file handle inside)."""

    #: Tensor entries in the header's own order (the last of duplicate names wins, as in the reader).
    tensors: Mapping[str, TensorInfo]
    #: The ``__metadata__`` map, or ``None`` when the key is absent or null.
    metadata: Mapping[str, str] | None
    #: N, the length of the JSON header in bytes (padding included).
    header_len: int
    #: Length of the data region (the largest end offset).
    data_len: int
    #: The N header bytes exactly as read.
    raw: bytes = field(repr=False)
    #: Number of trailing JSON whitespace bytes after the object (free room for a larger header).
    padding: int = 0
    #: Number of leading whitespace bytes before the object (accepted by the reader, not by A1111/Forge).
    leading_whitespace: int = 0
    #: Names that appear more than once (the reader keeps the last one; so do we).
    duplicate_keys: tuple[str, ...] = ()
    #: Whether the header had a ``__metadata__`` key at all (it may be null).
    has_metadata_key: bool = False
    #: Where the top-level object starts the ``__metadata__`` entry, if present: first or not.
    metadata_first: bool = True
    #: Entries the reference reader accepts in a form other readers do not: ``[dtype, shape, data_offsets]``
    #: or a dtype written ``{"F32": null}``. Read like the usual form; a rewrite writes the usual form.
    irregular_entries: tuple[str, ...] = ()
    #: Where the tensor entries start in :attr:`raw` (a byte offset) when the header is in the writer layout (compact,
    #: ``__metadata__`` first or absent): they run from there to the closing brace. ``None`` for any other layout.
    tensors_at: int | None = field(default=None, repr=False, compare=False)

    @property
    def data_start(self) -> int:
        """Return the file offset of the data region."""
        return PREFIX_SIZE + self.header_len

    @property
    def file_size(self) -> int:
        """Return the exact size a valid file with this header has."""
        return self.data_start + self.data_len

    @property
    def aligned(self) -> bool:
        """Return whether the data region starts on an 8-byte boundary."""
        return self.data_start % ALIGNMENT == 0

    @property
    def json_len(self) -> int:
        """Return the length of the JSON object itself, without surrounding whitespace."""
        return self.header_len - self.padding - self.leading_whitespace

    @property
    def warnings(self) -> tuple[str, ...]:
        """Return what is accepted by the reference reader but risky for other readers."""
        notes: list[str] = []
        if self.leading_whitespace:
            notes.append(
                f"header starts with {self.leading_whitespace} whitespace byte(s); "
                'A1111/Forge require it to start with {"'
            )
        if not self.aligned:
            notes.append(f"data region starts at offset {self.data_start}, not a multiple of {ALIGNMENT}")
        if self.duplicate_keys:
            names = ", ".join(repr(k) for k in self.duplicate_keys[:3])
            notes.append(f"duplicate tensor name(s) {names}: the last entry wins")
        if self.has_metadata_key and self.metadata is None:
            notes.append("__metadata__ is null")
        if self.irregular_entries:
            names = ", ".join(repr(k) for k in self.irregular_entries[:3])
            more = f" and {len(self.irregular_entries) - 3} more" if len(self.irregular_entries) > 3 else ""
            notes.append(
                f"tensor entr{'ies' if len(self.irregular_entries) > 1 else 'y'} {names}{more} in sequence form "
                '([dtype, shape, data_offsets]) or with a {"DTYPE": null} dtype: only serde-based readers accept '
                "that; a patch writes the usual form"
            )
        return tuple(notes)


# --------------------------------------------------------------------------------------------
# Parsing


class _Reject(Exception):
    """Internal: raised inside JSON hooks, turned into a HeaderError with the source attached."""

    def __init__(self, code: str, message: str, expected: object = None, got: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.expected = expected
        self.got = got


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(text: str) -> bool:
    # serde_json rejects "\ud800" style escapes that do not form a pair; Python's json accepts them.
    return _SURROGATE.search(text) is not None


# serde_json (as built into safetensors, without its ``float_roundtrip`` feature) reads a number that is not
# a 64-bit integer as significand * 10**exponent in f64 arithmetic: up to 19-20 leading digits, the rest
# dropped, then one multiplication by a power of ten. Near f64's maximum that differs from correct rounding
# (1.7976931348623158e308 is out of range for it), so the check below replays it.
_U64_TENTH, _U64_LAST = divmod(_U64_MAX, 10)
_I32_MAX = 2**31 - 1
_POW10_COUNT = 309


@functools.cache
def _serde_tables() -> tuple[re.Pattern[str], tuple[float, ...]]:
    # Built on first use (a number near f64's maximum is rare): the pattern costs milliseconds to compile.
    number = re.compile(r"-?(0|[1-9][0-9]*)(?:\.([0-9]+))?(?:[eE]([-+]?)([0-9]+))?")
    return number, tuple(float(f"1e{power}") for power in range(_POW10_COUNT))


def _take_digits(significand: int, digits: str) -> tuple[int, int]:
    """Append ``digits`` to a u64 ``significand`` until one would overflow; return it and how many fit."""
    taken = 0
    for char in digits:  # 20 digits fill a u64, so this stops early (leading zeros are stripped by callers)
        digit = ord(char) - 48
        if significand > _U64_TENTH or (significand == _U64_TENTH and digit > _U64_LAST):
            break
        significand = significand * 10 + digit
        taken += 1
    return significand, taken


def _serde_in_range(text: str) -> bool:
    """Return whether serde_json reads the JSON number ``text`` without a "number out of range" error."""
    number, pow10 = _serde_tables()
    match = number.fullmatch(text)
    if match is None:  # not a JSON number: the JSON parser has rejected it already
        return False
    whole, fraction, sign, exponent_digits = match.groups()
    # Integer digits that no longer fit only scale the value.
    significand, taken = _take_digits(0, whole)
    exponent = len(whole) - taken
    if fraction is None and exponent_digits is None and not exponent:
        return True  # a 64-bit integer: exact
    if fraction:
        if not significand:  # "0.000123": leading zeros only move the decimal point
            zeros = len(fraction) - len(fraction.lstrip("0"))
            exponent -= zeros
            fraction = fraction[zeros:]
        # Fraction digits that no longer fit are dropped.
        significand, taken = _take_digits(significand, fraction)
        exponent -= taken
    if exponent_digits is not None:
        written = exponent_digits.lstrip("0")
        if len(written) > 10 or int(written or "0") > _I32_MAX:
            # An exponent past i32: zero or a negative exponent gives 0.0, anything else is out of range.
            return significand == 0 or sign == "-"
        exponent = exponent - int(written or "0") if sign == "-" else exponent + int(written or "0")
        exponent = max(min(exponent, _I32_MAX), -_I32_MAX - 1)
    if exponent < 0:
        return True  # divisions only shrink the value
    if exponent >= _POW10_COUNT:
        return significand == 0
    return not math.isinf(float(significand) * pow10[exponent])


def _parse_float(text: str) -> float:
    value = float(text)
    # Below 1e308 the truncation and rounding of serde_json cannot reach infinity: skip the replay.
    if not abs(value) < 1e308 and not _serde_in_range(text):
        raise _Reject("invalid-json", f"number {text[:40]} is out of range")
    return value


def _parse_int(text: str) -> int | float:
    if text == "-0":
        # serde_json turns -0 into a float, so it is no valid size or offset.
        return -0.0
    return int(text)


def _int_out_of_range(value: Any) -> bool:
    # serde_json reads integers past 64 bits as f64 and rejects those past its range.
    return type(value) is int and abs(value) > _U64_MAX and not _serde_in_range(str(abs(value)))


# Bounded repr for values quoted in messages (a hostile shape can nest hundreds of lists).
_SHORT = reprlib.Repr()
_SHORT.maxlevel = 2
_SHORT.maxlist = 6


def _reject_constant(text: str) -> Any:
    raise _Reject("invalid-json", f"{text} is not valid JSON")


# A JSON object is decoded as the tuple of its (key, value) pairs: duplicate keys stay visible to the
# validator, and arrays (lists) never look like objects. ``tuple`` itself as the hook costs no Python frame.
_Object: type[tuple[Any, ...]] = tuple


def _nesting(value: Any, limit: int) -> int:
    """Return how deeply arrays and objects nest in ``value``, counting no further than ``limit``."""
    # Iterative: a hostile header can nest hundreds of levels, more than Python's recursion allows.
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if type(node) is _Object:
            children = [child for _, child in node]
        elif type(node) is list:
            children = node
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest >= limit:
                break
        stack.extend((child, depth) for child in children)
    return deepest


def _numbers_ok(value: Any) -> bool:
    if type(value) is _Object:
        return all(_numbers_ok(v) for _, v in value)
    if isinstance(value, list):
        return all(_numbers_ok(v) for v in value)
    return not _int_out_of_range(value)


def _strings_ok(value: Any) -> bool:
    if isinstance(value, str):
        return not _has_lone_surrogate(value)
    if type(value) is _Object:
        return all(not _has_lone_surrogate(k) and _strings_ok(v) for k, v in value)
    if isinstance(value, list):
        return all(_strings_ok(v) for v in value)
    return True


def _plain(value: Any) -> Any:
    """Turn parsed pairs back into ordinary dicts (last duplicate wins)."""
    if type(value) is _Object:
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _describe(value: Any) -> str:
    if type(value) is _Object:
        return "an object"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return type(value).__name__


_DECODER = json.JSONDecoder(
    object_pairs_hook=_Object,
    parse_float=_parse_float,
    parse_int=_parse_int,
    parse_constant=_reject_constant,
)
#: Without the integer hook: used when the text holds no ``-0`` number (the common case).
_FAST_DECODER = json.JSONDecoder(
    object_pairs_hook=_Object,
    parse_float=_parse_float,
    parse_constant=_reject_constant,
)
# A -0 integer token in valid JSON sits between [ , : and , ] } (whitespace allowed); a match inside a
# string only costs the slower decoder, and dates like "2024-01-05" do not match at all.
_NEGATIVE_ZERO = re.compile(r"[\[,:][ \t\n\r]*-0[ \t\n\r]*[,\]}]")
# Lone surrogates can only come from \uD8xx-\uDFxx escapes (strict UTF-8 decoding rejects encoded ones),
# so a header without such an escape needs no per-character scan.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def parse_length_prefix(prefix: bytes, file_size: int | None, *, source: str = "<bytes>") -> int:
    """Check the 8-byte length prefix against the limits and the file size; return N."""
    if len(prefix) < PREFIX_SIZE:
        raise HeaderError(
            "file too small to be safetensors",
            path=source,
            code="too-small",
            expected=f"at least {PREFIX_SIZE} bytes",
            got=f"{len(prefix)} bytes",
        )
    (n,) = struct.unpack("<Q", prefix[:PREFIX_SIZE])
    if n > MAX_HEADER_LEN:
        raise HeaderError(
            "header length prefix is too large",
            path=source,
            code="header-too-large",
            expected=f"at most {MAX_HEADER_LEN:,} bytes",
            got=f"{n:,}",
            hint="this is probably not a safetensors file",
        )
    if file_size is not None and PREFIX_SIZE + n > file_size:
        raise HeaderError(
            "header length prefix points past the end of the file",
            path=source,
            code="header-past-eof",
            expected=f"8 + N <= {file_size:,} (file size)",
            got=f"N = {n:,}",
            hint="the file is truncated or not safetensors",
        )
    return int(n)


def parse_header(raw: bytes, file_size: int | None = None, *, source: str = "<bytes>") -> Header:
    """Parse and validate the N header bytes ``raw``; ``file_size`` (if known) must match exactly."""
    # A FLUX header decodes into ~20,000 containers that cannot form reference cycles; the cyclic collector
    # would walk them again and again while they are built (about a sixth of the time), so pause it.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _parse_header(raw, file_size, source)
    finally:
        if collecting:
            gc.enable()


def _parse_header(raw: bytes, file_size: int | None, source: str) -> Header:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(
            f"header is not valid UTF-8 at byte {exc.start}",
            path=source,
            code="invalid-utf8",
            hint="the file is corrupt or not safetensors",
        ) from exc
    if text.startswith("\ufeff"):
        raise HeaderError(
            "header starts with a UTF-8 byte order mark",
            path=source,
            code="bom",
            expected='"{"',
            got="EF BB BF",
        )
    stripped = text.lstrip(JSON_WHITESPACE)
    leading = len(text) - len(stripped)
    if not stripped.startswith("{"):
        if not stripped:
            raise HeaderError("header is empty or blank", path=source, code="invalid-json")
        if stripped[0] in '["-0123456789tfn':
            raise HeaderError(
                "header is not a JSON object",
                path=source,
                code="not-object",
                expected="an object",
                got=repr(stripped[:20]),
            )
        raise HeaderError("header is not JSON", path=source, code="invalid-json", got=repr(stripped[:20]))
    surrogates = bool(_SURROGATE_ESCAPE.search(text))
    try:
        scanned = None if surrogates else _scan_plain(text, leading)
        if scanned is not None:
            metadata, has_metadata_key, tensors, data_len, first, end = scanned
            _check_padding(text[end:], source)
            if data_len is None:
                # Offsets that do not tile the data region, a zero-element tensor, or an overflow: the precise
                # check gives the verdict and the error, as on the decoder path.
                data_len = _validate_offsets(tensors)
            # A character index is a byte index in ASCII; otherwise count the bytes before the first entry.
            tensors_at = first if raw.isascii() else len(text[:first].encode("utf-8"))
            return _finish(
                raw,
                len(text) - end,
                leading,
                file_size,
                tensors,
                data_len,
                metadata,
                has_metadata_key=has_metadata_key,
                tensors_at=tensors_at,
            )
    except _Reject as exc:
        raise HeaderError(exc.message, path=source, code=exc.code, expected=exc.expected, got=exc.got) from None
    # Only a -0 number needs the integer hook (serde_json reads it as a float): skip the hook when absent.
    decoder = _DECODER if "-0" in text and _NEGATIVE_ZERO.search(text) else _FAST_DECODER
    try:
        top, end = decoder.raw_decode(text, leading)
    except _Reject as exc:
        raise HeaderError(exc.message, path=source, code=exc.code) from None
    except json.JSONDecodeError as exc:
        raise HeaderError(
            f"header is not valid JSON: {exc.msg} at character {exc.pos}",
            path=source,
            code="invalid-json",
        ) from None
    except RecursionError:
        raise HeaderError("header JSON is nested too deeply", path=source, code="invalid-json") from None
    except ValueError as exc:  # an integer with more digits than int() accepts
        raise HeaderError(f"header has a number out of range: {exc}", path=source, code="invalid-json") from None
    _check_padding(text[end:], source)
    assert type(top) is _Object
    try:
        return _validate(top, raw, len(text) - end, leading, file_size, surrogates)
    except _Reject as exc:
        raise HeaderError(exc.message, path=source, code=exc.code, expected=exc.expected, got=exc.got) from None


def _check_padding(rest: str, source: str) -> None:
    """Refuse anything but JSON whitespace after the top-level object."""
    trailing = rest.rstrip(JSON_WHITESPACE)
    if trailing:
        raise HeaderError(
            "header has bytes after the JSON object that are not whitespace",
            path=source,
            code="bad-padding",
            expected="spaces (0x20) only",
            got=repr(trailing[:12]),
        )


# The layout every writer produces, matched without building the JSON document: one regular expression per
# tensor entry, a strict subset of JSON (compact, names without escapes or control characters, an upper-case
# dtype, integers without sign or leading zeros and at most 20 digits). Anything else goes to the JSON decoder.
# (A whitespace-tolerant variant costs more to compile at every start than it saves on the rare spaced header.)
_WS = r"[ \t\n\r]*"
_UINT = r"(?:0|[1-9][0-9]{0,19})"
_PLAIN_ENTRY = re.compile(
    r'"([^"\\\x00-\x1f]*)":\{"dtype":"([A-Z0-9_]{1,16})",'
    rf'"shape":\[((?:{_UINT},)*{_UINT})?\],"data_offsets":\[({_UINT}),({_UINT})\]\}}([,}}])'
)
_PLAIN_METADATA = re.compile(_WS + r"\{" + _WS + f'"{METADATA_KEY}"' + _WS + ":" + _WS)
_PLAIN_OPEN = re.compile(_WS + r"\{")
_PLAIN_COMMA = re.compile(_WS + ",")
#: The characters of a plain entry besides its six groups: quotes, keys, colons, brackets and the comma.
_PLAIN_ENTRY_FIXED = len('"":{"dtype":"","shape":[],"data_offsets":[,]}')

_Scanned = tuple[dict[str, str] | None, bool, dict[str, TensorInfo], int | None, int, int]


def _scan_plain(text: str, start: int) -> _Scanned | None:
    """Read a header in the plain layout in one pass; None when it is not plain (the decoder decides then).

    Returns the metadata, whether the key was there, the tensor table, the data length (None when the
    offsets need the precise check), where the first tensor entry starts and where the object ends. The
    table is built straight from the text, without the decoded document beside it: memory follows the
    header, time is one match per tensor, and repeated shapes share one tuple.
    """
    metadata: dict[str, str] | None = None
    has_metadata = False
    found = _PLAIN_METADATA.match(text, start)
    if found is not None:
        # __metadata__ first, as the reference writer puts it: its strings may hold any escape, so the JSON
        # decoder reads just that value.
        try:
            value, position = _FAST_DECODER.raw_decode(text, found.end())
        except (ValueError, _Reject, RecursionError):
            return None
        if value is not None and (type(value) is not _Object or not all(type(item) is str for _, item in value)):
            return None
        metadata = None if value is None else dict(value)
        has_metadata = True
        comma = _PLAIN_COMMA.match(text, position)
        if comma is None:
            return None
        position = comma.end()
    else:
        opened = _PLAIN_OPEN.match(text, start)
        if opened is None:
            return None
        position = opened.end()
    first = position
    # Every entry at once (one C loop); they must then follow each other with no gap from ``position`` to
    # the closing brace. findall skips text that does not match, so that is checked by length: the entries
    # end at ``position`` plus the sum of their lengths only when contiguous; with a gap, the closing brace
    # of the last one lies past that point, which then is not followed by whitespace alone.
    rows = _PLAIN_ENTRY.findall(text, position)
    count = len(rows)
    if not count:
        return None
    closings = list(map(itemgetter(5), rows))
    if closings[-1] != "}" or closings.count("}") != 1:
        return None
    end = position + len("".join(chain.from_iterable(rows))) + count * _PLAIN_ENTRY_FIXED
    if text[end:].strip(JSON_WHITESPACE):
        return None  # a gap: not the plain layout, the decoder decides
    # Columns, then the matches go (their tuples and number strings were the peak of the parse's memory).
    names = list(map(itemgetter(0), rows))
    dtypes = list(map(itemgetter(1), rows))
    dims = list(map(itemgetter(2), rows))
    begins = list(map(int, map(itemgetter(3), rows)))
    ends = list(map(int, map(itemgetter(4), rows)))
    del rows, closings
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}
    for text_dims in dict.fromkeys(dims):  # a few hundred distinct shapes: each parsed once, shared
        shape = tuple(map(int, text_dims.split(","))) if text_dims else ()
        if len(shape) > _FAST_MAX_DIMS or (shape and max(shape) > _U64_MAX):
            return None  # left to the checked loop, which stops at the first overflow
        shapes[text_dims] = (shape, math.prod(shape))
    known = list(map(shapes.__getitem__, dims))
    del dims
    try:
        nbits = list(map(mul, map(itemgetter(1), known), map(_BITS.__getitem__, dtypes)))
    except KeyError:
        return None  # a dtype safetensors does not know: the decoder path says which
    offsets = zip(begins, ends, strict=True)
    fields = zip(map(_DTYPE_NAMES.__getitem__, dtypes), map(itemgetter(0), known), offsets, repeat(()))
    tensors = dict(zip(names, map(_make_info, fields), strict=True))
    del names, dtypes, known
    if len(tensors) != count or METADATA_KEY in tensors:
        return None  # a duplicate name (the decoder path reports which), or the metadata key as a tensor
    return metadata, has_metadata, tensors, _fast_extent(nbits, begins, ends), first, end


def _validate(
    top: tuple[tuple[str, Any], ...], raw: bytes, padding: int, leading: int, file_size: int | None, surrogates: bool
) -> Header:
    metadata: dict[str, str] | None = None
    metadata_first = True
    names = [name for name, _ in top]
    metadata_count = names.count(METADATA_KEY)
    if metadata_count > 1:
        raise _Reject("duplicate-metadata", "header has more than one __metadata__ key")
    entries = top
    if metadata_count:
        index = names.index(METADATA_KEY)
        metadata_first = index == 0
        metadata = _validate_metadata(top[index][1], surrogates)
        entries = top[:index] + top[index + 1 :]
    # The bulk checks cover the layout every writer produces; anything else gets the precise per-entry checks.
    fast = None if surrogates else _fast_table(entries)
    data_len: int | None = None
    irregular: dict[str, None] = {}
    if fast is None:
        tensors = _checked_table(entries, surrogates, irregular)
    else:
        tensors, data_len = fast
    duplicates: tuple[str, ...] = ()
    if len(tensors) != len(entries):
        seen: set[str] = set()
        repeated: dict[str, None] = {}
        for name, _ in entries:
            if name in seen:
                repeated[name] = None
            seen.add(name)
        duplicates = tuple(repeated)
    if data_len is None:
        if fast is not None:
            # The bulk pass leaves range checks to the offsets check: run the precise entry checks first
            # (they also cover the overridden entries of a duplicate name, which the reader deserializes too).
            _checked_table(entries, surrogates, irregular)
        data_len = _validate_offsets(tensors)
    return _finish(
        raw,
        padding,
        leading,
        file_size,
        tensors,
        data_len,
        metadata,
        has_metadata_key=bool(metadata_count),
        metadata_first=metadata_first,
        duplicates=duplicates,
        irregular=tuple(irregular),
    )


def _finish(
    raw: bytes,
    padding: int,
    leading: int,
    file_size: int | None,
    tensors: dict[str, TensorInfo],
    data_len: int,
    metadata: dict[str, str] | None,
    *,
    has_metadata_key: bool,
    metadata_first: bool = True,
    duplicates: tuple[str, ...] = (),
    irregular: tuple[str, ...] = (),
    tensors_at: int | None = None,
) -> Header:
    """Check the file size against the header and return the :class:`Header`."""
    header_len = len(raw)
    if file_size is not None:
        expected = PREFIX_SIZE + header_len + data_len
        if file_size != expected:
            missing = file_size < expected
            raise _Reject(
                "missing-data" if missing else "trailing-data",
                "file is shorter than its header says" if missing else "file has bytes past the last tensor",
                expected=f"{expected:,} bytes (8 + header {header_len:,} + data {data_len:,})",
                got=f"{file_size:,}",
            )
    return Header(
        tensors=MappingProxyType(tensors),
        metadata=MappingProxyType(metadata) if metadata is not None else None,
        header_len=header_len,
        data_len=data_len,
        raw=raw,
        padding=padding,
        leading_whitespace=leading,
        duplicate_keys=duplicates,
        has_metadata_key=has_metadata_key,
        metadata_first=metadata_first,
        irregular_entries=irregular,
        tensors_at=tensors_at,
    )


_BITS = dict(DTYPE_BITS)
# Real tensors have a handful of dims. Past this, the product is left to the checked loop, which stops at
# the first overflow instead of multiplying out (say) 100,000 dims of 2**64 - 1.
_FAST_MAX_DIMS = 16
_make_info = partial(tuple.__new__, TensorInfo)
#: The one string object of each dtype name: every entry of a table shares it.
_DTYPE_NAMES = {name: name for name in DTYPE_BITS}


def _fast_table(entries: tuple[tuple[str, Any], ...]) -> tuple[dict[str, TensorInfo], int | None] | None:
    """Return the tensor table and data length when every entry is a plain valid entry, else None.

    "Plain" is the layout every writer produces: exactly ``dtype``, ``shape``, ``data_offsets`` in that
    order, a known dtype, non-negative integers. The data length is None when the offsets or sizes need
    the precise check (duplicate names, a hole, a size mismatch, a zero-element tensor).
    """
    # One lean pass per entry, the integer checks in bulk afterwards: a FLUX header has 2,600 entries.
    tensors: dict[str, TensorInfo] = {}
    shapes: list[list[Any]] = []
    begins: list[Any] = []
    ends: list[Any] = []
    bits_per_element: list[int] = []
    try:
        for name, value in entries:
            if type(value) is not _Object or len(value) != 3:
                return None
            (k0, dtype), (k1, shape), (k2, offsets) = value
            if (
                k0 != "dtype"
                or k1 != "shape"
                or k2 != "data_offsets"
                or type(shape) is not list
                or type(offsets) is not list
                or len(offsets) != 2
            ):
                return None
            bits = _BITS.get(dtype)  # TypeError for an unhashable dtype: not plain either
            if bits is None or type(dtype) is not str:
                return None
            begin, end = offsets
            shapes.append(shape)
            begins.append(begin)
            ends.append(end)
            bits_per_element.append(bits)
            tensors[name] = _make_info((dtype, tuple(shape), (begin, end), ()))
    except TypeError:  # an unhashable dtype (an array or an object holding one)
        return None
    dims = list(chain.from_iterable(shapes))
    # Only integers from here on: a product over ["2", 2**40] would build a string of 2**40 characters.
    if (set(map(type, begins)) | set(map(type, ends)) | set(map(type, dims))) - {int} or (dims and min(dims) < 0):
        return None
    if not tensors:
        return tensors, 0
    if len(tensors) != len(entries):
        # The last of duplicate names wins: only the survivors' offsets count, as in the reader.
        return tensors, None
    if max(map(len, shapes)) > _FAST_MAX_DIMS:
        return tensors, None
    nbits = list(map(mul, map(math.prod, shapes), bits_per_element))
    return tensors, _fast_extent(nbits, begins, ends)


def _fast_extent(nbits: list[int], begins: list[int], ends: list[int]) -> int | None:
    """Return the data length if the offsets tile the data region and every size matches, else None."""
    if not all(map(le, begins, ends)):
        return None
    # Sorted by (begin, end), each tensor must start where the previous one ended, the first at 0. Writers
    # list tensors in offset order, and with begin <= end a chain that holds in header order holds sorted.
    if begins[0] != 0 or begins[1:] != ends[:-1]:
        ordered = sorted(zip(begins, ends, strict=True))
        sorted_begins = [begin for begin, _ in ordered]
        sorted_ends = [end for _, end in ordered]
        if sorted_begins[0] != 0 or sorted_begins[1:] != sorted_ends[:-1]:
            return None
    # Zero elements may hide an overflow of the running product ([2**40, 2**40, 0]): leave it to the slow
    # check. Otherwise every dimension is at most the product, so bits <= 2**64 - 1 bounds them all.
    if 0 in nbits or max(nbits) > _U64_MAX or max(ends) > _U64_MAX:
        return None
    if nbits != list(map(mul, map(sub, ends, begins), repeat(8))):
        return None
    return max(ends)


def _checked_table(
    entries: tuple[tuple[str, Any], ...], surrogates: bool, irregular: dict[str, None]
) -> dict[str, TensorInfo]:
    """Return the tensor table, raising the precise error for the first bad entry.

    Names of entries in an irregular form (sequence, tagged dtype) are added to ``irregular``.
    """
    tensors: dict[str, TensorInfo] = {}
    for name, value in entries:
        if surrogates and _has_lone_surrogate(name):
            raise _Reject("invalid-json", f"key {name!r} contains a lone surrogate escape")
        tensors[name] = _validate_entry(name, value, surrogates, irregular)
    return tensors


def _validate_metadata(value: Any, surrogates: bool) -> dict[str, str] | None:
    if value is None:
        return None
    if type(value) is not _Object:
        raise _Reject("bad-metadata", "__metadata__ is not an object", expected="an object", got=_describe(value))
    out: dict[str, str] = {}
    for key, item in value:
        if not isinstance(item, str):
            raise _Reject(
                "bad-metadata-value",
                f"__metadata__[{key!r}] is not a string",
                expected="a JSON string",
                got=_describe(item),
            )
        if surrogates and (_has_lone_surrogate(key) or _has_lone_surrogate(item)):
            raise _Reject("invalid-json", f"__metadata__[{key!r}] contains a lone surrogate escape")
        out[key] = item
    return out


def _validate_entry(name: str, value: Any, surrogates: bool, irregular: dict[str, None]) -> TensorInfo:
    extra: dict[str, Any] = {}
    if type(value) is list:
        # serde deserializes a struct from a sequence of its fields in declaration order, nothing else.
        if len(value) != len(TENSOR_FIELDS):
            raise _Reject(
                "bad-entry",
                f"tensor {name!r} is a sequence of {len(value)} element(s)",
                expected="an object, or the sequence [dtype, shape, data_offsets]",
                got=_SHORT.repr(value),
            )
        irregular[name] = None
        dtype, shape, offsets = value
    elif type(value) is not _Object:
        raise _Reject("bad-entry", f"tensor {name!r} is not an object", expected="an object", got=_describe(value))
    elif len(value) == 3 and value[0][0] == "dtype" and value[1][0] == "shape" and value[2][0] == "data_offsets":
        # The layout every writer produces: no duplicate or unknown fields to look at.
        dtype, shape, offsets = value[0][1], value[1][1], value[2][1]
    else:
        known: dict[str, Any] = {}
        for key, item in value:
            if key in TENSOR_FIELDS:
                if key in known:
                    raise _Reject("duplicate-field", f"tensor {name!r} has field {key!r} twice")
                known[key] = item
            else:
                if (
                    # The top-level object and the entry are two levels already (checked against the oracle).
                    _nesting(item, MAX_JSON_DEPTH - 2) >= MAX_JSON_DEPTH - 2
                    or not _numbers_ok(item)
                    or (surrogates and not (_strings_ok(item) and _strings_ok(key)))
                ):
                    raise _Reject("invalid-json", f"tensor {name!r} field {key!r} is not acceptable JSON")
                extra[key] = _plain(item)
        for key in TENSOR_FIELDS:
            if key not in known:
                raise _Reject("missing-field", f"tensor {name!r} has no {key!r}")
        dtype, shape, offsets = known["dtype"], known["shape"], known["data_offsets"]
    if type(dtype) is _Object:
        dtype = _untagged_dtype(name, dtype)
        irregular[name] = None
    if type(dtype) is not str:
        raise _Reject("bad-dtype", f"tensor {name!r} dtype is not a string", got=_describe(dtype))
    if dtype not in DTYPE_BITS:
        if surrogates and _has_lone_surrogate(dtype):
            raise _Reject("invalid-json", f"tensor {name!r} dtype contains a lone surrogate escape")
        upper = dtype.upper()
        hint = f" (dtypes are case-sensitive: {upper})" if upper in DTYPE_BITS else ""
        raise _Reject("unknown-dtype", f"tensor {name!r} has unknown dtype {dtype[:40]!r}{hint}")
    if type(shape) is not list or not _all_usize(shape):
        raise _Reject(
            "bad-shape",
            f"tensor {name!r} shape is not a list of non-negative integers",
            got=_describe(shape) if type(shape) is not list else _SHORT.repr(shape),
        )
    if type(offsets) is not list or len(offsets) != 2 or not _all_usize(offsets):
        raise _Reject(
            "bad-offsets",
            f"tensor {name!r} data_offsets is not a pair of non-negative integers",
            got=_describe(offsets) if type(offsets) is not list else _SHORT.repr(offsets),
        )
    return TensorInfo(dtype, tuple(shape), (offsets[0], offsets[1]), tuple(extra.items()))


def _untagged_dtype(name: str, tagged: tuple[tuple[str, Any], ...]) -> str:
    """Return the dtype of serde's externally tagged form of a unit variant: ``{"F32": null}`` -> ``F32``."""
    if len(tagged) != 1:
        raise _Reject(
            "bad-dtype",
            f"tensor {name!r} dtype is an object with {len(tagged)} keys",
            expected='a string, or an object with one key such as {"F32": null}',
            got=_SHORT.repr(dict(tagged)),
        )
    variant, unit = tagged[0]
    if unit is not None:
        raise _Reject(
            "bad-dtype",
            f"tensor {name!r} dtype {{{variant[:40]!r}: ...}} does not hold null",
            expected="null",
            got=_describe(unit),
        )
    return variant


def _all_usize(values: list[Any]) -> bool:
    # map(type, ...) keeps the loop in C: bools and floats are rejected, as serde does for usize.
    return not values or (set(map(type, values)) == {int} and min(values) >= 0 and max(values) <= _U64_MAX)


def _validate_offsets(tensors: Mapping[str, TensorInfo]) -> int:
    ordered = sorted(tensors.items(), key=lambda item: item[1].data_offsets)
    position = 0
    for name, info in ordered:
        begin, end = info.data_offsets
        if begin != position or end < begin:
            if begin > position:
                what = f"leaves a hole before tensor {name!r}"
            elif end < begin:
                what = f"tensor {name!r} ends before it begins"
            else:
                what = f"tensor {name!r} overlaps the previous one"
            raise _Reject(
                "invalid-offset", f"data_offsets {what}", expected=f"begin {position}", got=list(info.data_offsets)
            )
        position = end
        # The reader multiplies left to right with checked_mul: [2**40, 2**40, 0] overflows before the 0.
        # Stopping at the first overflow also keeps a shape of 100,000 huge dims from costing minutes.
        count = 1
        for dim in info.shape:
            count *= dim
            if count > _U64_MAX:
                raise _Reject("overflow", f"tensor {name!r} element count overflows 64 bits")
        bits = count * DTYPE_BITS[info.dtype]
        if bits > _U64_MAX:
            raise _Reject("overflow", f"tensor {name!r} bit count overflows 64 bits")
        if bits % 8:
            raise _Reject("misaligned-slice", f"tensor {name!r} does not fill whole bytes ({bits} bits)")
        if end - begin != bits // 8:
            raise _Reject(
                "size-mismatch",
                f"tensor {name!r} byte range does not match its shape and dtype",
                expected=f"{bits // 8} bytes ({info.dtype} {_SHORT.repr(list(info.shape))})",
                got=f"{end - begin} bytes",
            )
    return position


# --------------------------------------------------------------------------------------------
# Serialization


def check_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    """Return ``metadata`` as a plain dict after checking it can be written (str keys and values)."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MetadataError(
                f"metadata entry {key!r} is not a string",
                code="bad-metadata-value",
                expected="str",
                got=type(value).__name__,
            )
        if _has_lone_surrogate(key) or _has_lone_surrogate(value):
            raise MetadataError(f"metadata entry {key!r} contains a lone surrogate", code="lone-surrogate")
        out[key] = value
    return out


def reserialize(header: Header, metadata: Mapping[str, str] | None) -> bytes:
    """Return ``header``'s tensor table under ``metadata``, compact (no padding): :func:`serialize_header`'s bytes.

    A header in the writer layout keeps its tensor entries byte for byte (they are what the serializer writes,
    and what :func:`shares_tensor_table` recognises); only the ``__metadata__`` entry is written. Any other
    layout is serialized entry by entry.
    """
    at = header.tensors_at
    if at is None:
        return serialize_header(metadata, header.tensors).rstrip(b" ")
    entries = header.raw[at : len(header.raw) - header.padding]  # the entries and the closing brace
    if metadata is None:
        return b"{" + entries
    opening = _METADATA_OPENING + _compact_json(check_metadata(metadata)).encode("utf-8") + b","
    return opening + entries


def serialize_header(
    metadata: Mapping[str, str] | None,
    tensors: Mapping[str, TensorInfo],
    *,
    length: int | None = None,
) -> bytes:
    """Return header bytes: compact JSON, ``__metadata__`` first, tensors in the given order.

    Padded at the end with spaces so ``8 + N`` is a multiple of :data:`ALIGNMENT`, or to exactly
    ``length`` bytes when given (a :class:`MetadataError` if it does not fit).
    """
    # The same bytes as json.dumps of the whole object (compact, non-ASCII kept), written entry by entry:
    # no dict per tensor, and a plain entry is one string format.
    parts: list[str] = []
    if metadata is not None:
        parts.append(f"{_json_string(METADATA_KEY)}:{_compact_json(check_metadata(metadata))}")
    for name, info in tensors.items():
        if info.extra:
            parts.append(f"{_json_string(name)}:{_compact_json(info.to_json_obj())}")
        else:
            begin, end = info.data_offsets
            shape = ",".join(map(str, info.shape))
            parts.append(
                f'{_json_string(name)}:{{"dtype":{_json_string(info.dtype)},"shape":[{shape}],'
                f'"data_offsets":[{begin},{end}]}}'
            )
    body = ("{" + ",".join(parts) + "}").encode("utf-8")
    if length is None:
        length = len(body) + (-(PREFIX_SIZE + len(body)) % ALIGNMENT)
    if len(body) > length:
        raise MetadataError(
            "new header does not fit in the space given", code="no-fit", expected=f"<= {length}", got=len(body)
        )
    if length > MAX_HEADER_LEN:
        raise MetadataError(
            "new header is larger than safetensors allows",
            code="header-too-large",
            expected=f"at most {MAX_HEADER_LEN:,} bytes",
            got=f"{length:,}",
        )
    return body + b" " * (length - len(body))


#: A JSON string literal, non-ASCII kept (what json.dumps(ensure_ascii=False) writes for a str).
_json_string = json.encoder.encode_basestring
_compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def minimal_header_len(metadata: Mapping[str, str] | None, tensors: Mapping[str, TensorInfo]) -> int:
    """Return the length of the unpadded serialization (what a new header needs at least)."""
    return len(serialize_header(metadata, tensors, length=MAX_HEADER_LEN).rstrip(b" "))


def pack_prefix(header_bytes: bytes) -> bytes:
    """Return the 8-byte length prefix followed by the header bytes."""
    return struct.pack("<Q", len(header_bytes)) + header_bytes


def metadata_equal(a: Mapping[str, str] | None, b: Mapping[str, str] | None) -> bool:
    """Compare two metadata maps key by key (order never matters; ``None`` equals ``{}``)."""
    return dict(a or {}) == dict(b or {})


def same_tensors(a: Mapping[str, TensorInfo], b: Mapping[str, TensorInfo]) -> bool:
    """Return whether two tensor tables are identical, order included."""
    return list(a.items()) == list(b.items())


_METADATA_OPENING = b"{" + json.dumps(METADATA_KEY).encode() + b":"


def shares_tensor_table(old: Header, new_raw: bytes, metadata: Mapping[str, str] | None) -> bool:
    """Return whether ``new_raw`` is shown, without parsing it, to be ``old``'s tensor table under ``metadata``.

    True when ``new_raw`` is ``{`` + the ``__metadata__`` entry + ``,`` + the very bytes of ``old``'s tensor
    entries (which the strict reader accepted) + ``}`` + spaces, and that entry decodes to exactly ``metadata``
    (no ``__metadata__`` entry when it is ``None``). Such a header passes the strict reader with ``old``'s table:
    the entries are checked one by one and their offsets against each other, never against the metadata. False
    means only "not shown" (``old`` not in the writer layout, or a different header): parse it then.
    """
    at = old.tensors_at
    if at is None:
        return False
    entries = old.raw[at : len(old.raw) - old.padding]  # the tensor entries and the closing brace
    body = new_raw.rstrip(b" ")
    if not body.endswith(entries):
        return False
    head = body[: len(body) - len(entries)]
    if metadata is None:
        return head == b"{"
    if not (head.startswith(_METADATA_OPENING) and head.endswith(b",")):
        return False
    try:
        pairs = json.loads(head[len(_METADATA_OPENING) : -1].decode("utf-8"), object_pairs_hook=tuple)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
        return False
    return (
        type(pairs) is tuple
        and len(pairs) == len(metadata)
        and all(type(value) is str for _, value in pairs)
        and dict(pairs) == dict(metadata)
    )


# --------------------------------------------------------------------------------------------
# Thin I/O


def _read_exact(f: Any, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = f.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


#: How long an open waits while another nunchaku-patch holds a write lease (its insert takes milliseconds).
LEASE_PATIENCE = 5.0


def open_nonblocking(name: str, flags: int, *, patience: float = LEASE_PATIENCE) -> int:
    """Open with O_NONBLOCK (a FIFO must not hang us), waiting out a write lease held by another patcher.

    On Linux a non-blocking open of a file under a lease fails with EWOULDBLOCK instead of waiting for the
    lease holder; ours are held only for the few milliseconds of an insert-range, so retry briefly.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            return os.open(name, flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> int:
    """Open ``path`` without blocking on FIFOs and return the fd, refusing anything but a regular file."""
    name = os.fspath(path)
    try:
        fd = open_nonblocking(name, flags)
    except BlockingIOError:
        raise HeaderError(
            "another process holds a lease on the file",
            path=name,
            code="locked",
            hint="another nunchaku-patch may be writing it: try again",
        ) from None
    except FileNotFoundError:
        raise HeaderError("no such file", path=name, code="not-found") from None
    except IsADirectoryError:
        raise HeaderError("is a directory, not a safetensors file", path=name, code="not-a-file") from None
    except PermissionError:
        raise HeaderError("permission denied", path=name, code="permission") from None
    except OSError as exc:
        raise HeaderError(f"cannot open: {exc.strerror}", path=name, code="io") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise HeaderError(f"is {kind}, not a safetensors file", path=name, code="not-a-file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_header_fd(fd: int, *, source: str) -> Header:
    """Read and validate the header of an open regular file (only the prefix and N header bytes)."""
    file_size = os.fstat(fd).st_size
    with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
        f.seek(0)
        prefix = _read_exact(f, PREFIX_SIZE)
        n = parse_length_prefix(prefix, file_size, source=source)
        raw = _read_exact(f, n)
    if len(raw) != n:
        raise HeaderError("file shrank while being read", path=source, code="io")
    return parse_header(raw, file_size, source=source)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of ``path`` without reading the data region."""
    name = os.fspath(path)
    fd = open_regular(name)
    try:
        return read_header_fd(fd, source=name)
    except OSError as exc:
        raise HeaderError(f"cannot read: {exc.strerror}", path=name, code="io") from None
    finally:
        os.close(fd)


def parse_file_bytes(blob: bytes, *, source: str = "<bytes>") -> Header:
    """Validate a whole file held in memory (for tests and fuzzing)."""
    n = parse_length_prefix(blob[:PREFIX_SIZE], len(blob), source=source)
    raw = blob[PREFIX_SIZE : PREFIX_SIZE + n]
    return parse_header(raw, len(blob), source=source)


def iter_tensor_names(header: Header, suffix: str) -> Iterable[str]:
    """Yield tensor names ending with ``suffix`` in header order."""
    return (name for name in header.tensors if name.endswith(suffix))
