#!/usr/bin/env python3
"""Generate the header test corpus: malformed files in tests/fixtures/invalid, tricky valid ones in valid/.

Deterministic: running it twice gives byte-identical files (the tests check the committed corpus is what
this script writes). Each invalid file breaks exactly one rule of safetensors-rules.md; MANIFEST.json maps
its name to the ``HeaderError.code`` nunchaku-patch must report and a one-line description. The valid
MANIFEST.json gives what a correct reader finds in each valid file.

Usage: python scripts/make_invalid_fixtures.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class Invalid:
    """One malformed file and the error code it must produce."""

    name: str
    blob: bytes
    code: str
    description: str


@dataclass(frozen=True)
class Valid:
    """One valid file and what a reader must find in it."""

    name: str
    blob: bytes
    description: str
    tensors: int
    data_len: int
    metadata: dict[str, str] | None = None


def data(length: int) -> bytes:
    """Return a deterministic, non-zero data region (so a shifted region would show)."""
    return bytes((i * 7 + 3) % 251 for i in range(length))


def pad(header: bytes) -> bytes:
    """Pad header bytes with spaces so that 8 + N is a multiple of 8, as the reference writer does."""
    return header + b" " * (-(8 + len(header)) % 8)


def blob(header: str | bytes, data_len: int = 0, *, padded: bool = True, n: int | None = None) -> bytes:
    """Return prefix + header + data; ``n`` overrides the length prefix."""
    raw = header.encode("utf-8") if isinstance(header, str) else header
    if padded:
        raw = pad(raw)
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data(data_len)


def compact(obj: object) -> str:
    """Return compact JSON (non-ASCII kept, like the reference writer)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def entry(dtype: str, shape: list[int], begin: int, end: int, **extra: object) -> dict[str, object]:
    """Return one tensor entry."""
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end], **extra}


#: A valid entry to build on: F32 [2, 2] at [0, 16].
A = '"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}'


def one(body: str, data_len: int = 16) -> bytes:
    """Return a file whose header is ``{body}`` with a ``data_len``-byte data region."""
    return blob("{" + body + "}", data_len)


def extra_field(value_json: str) -> bytes:
    """Return a valid one-tensor file whose entry has an extra field ``x`` holding ``value_json``."""
    return one('"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16],"x":' + value_json + "}")


def invalid_cases() -> list[Invalid]:
    """Return the malformed corpus, one broken rule per file."""
    meta = '"__metadata__":{"format":"pt"}'
    cases = [
        # --- the length prefix
        Invalid("too-small-0-bytes", b"", "too-small", "empty file, no length prefix"),
        Invalid("too-small-7-bytes", b"\x02\x00\x00\x00\x00\x00\x00", "too-small", "7 bytes, a truncated prefix"),
        Invalid(
            "n-over-limit",
            blob("{}", n=100_000_001),
            "header-too-large",
            "N = 100,000,001, one over the 100,000,000 cap",
        ),
        Invalid("n-2-pow-63", blob("{}", n=2**63), "header-too-large", "N = 2**63 (would overflow a signed size)"),
        Invalid("n-u64-max", blob("{}", n=U64_MAX), "header-too-large", "N = 2**64 - 1"),
        Invalid("n-past-eof", blob("{" + A + "}", 16, n=4096), "header-past-eof", "N = 4096 in an 88-byte file"),
        # --- encoding and JSON syntax
        Invalid(
            "invalid-utf8",
            blob(b'{"__metadata__":{"k":"caf\xe9"}}'),
            "invalid-utf8",
            "Latin-1 byte 0xE9 inside a metadata string",
        ),
        Invalid(
            "invalid-utf8-encoded-surrogate",
            blob(b'{"__metadata__":{"k":"\xed\xa0\x80"}}'),
            "invalid-utf8",
            "a surrogate encoded as UTF-8 bytes (ED A0 80)",
        ),
        Invalid("not-json", blob("hello world"), "invalid-json", "plain text instead of JSON"),
        Invalid("json-array-top", blob("[1,2,3]"), "not-object", "top level is a JSON array"),
        Invalid("json-string-top", blob('"header"'), "not-object", "top level is a JSON string"),
        Invalid("blank-header", blob(b"        ", padded=False), "invalid-json", "header is only spaces"),
        Invalid("bom", blob(b"\xef\xbb\xbf{" + meta.encode() + b"}"), "bom", "UTF-8 byte order mark before {"),
        Invalid("nul-padding", blob(b"{" + meta.encode() + b"}\x00\x00\x00\x00\x00\x00"), "bad-padding", "NUL padding"),
        Invalid("garbage-after-object", blob("{" + meta + "} x"), "bad-padding", "a non-whitespace byte after }"),
        Invalid("two-objects", blob("{}{}"), "bad-padding", "a second JSON object after the first"),
        Invalid("trailing-comma", one(A + ","), "invalid-json", "trailing comma after the last entry"),
        Invalid("comment", blob("{" + A + "} // c", 16), "bad-padding", "a // comment after the object"),
        Invalid("single-quotes", one(A.replace('"a"', "'a'")), "invalid-json", "a single-quoted key"),
        Invalid("leading-zero", one(A.replace("[2,2]", "[02,2]")), "invalid-json", "a number with a leading zero"),
        Invalid("control-char", blob('{"__metadata__":{"k":"a\tb"}}'), "invalid-json", "raw TAB inside a string"),
        Invalid("truncated-json", blob('{"__metadata__":{"k":"v"}', padded=False), "invalid-json", "missing }"),
        Invalid(
            "form-feed-padding", blob(b"{}\x0c\x0c\x0c\x0c\x0c\x0c", padded=False), "bad-padding", "form feed padding"
        ),
        Invalid("lone-surrogate-key", one(A.replace('"a"', '"a\\ud800"')), "invalid-json", "key with \\ud800 escape"),
        Invalid(
            "lone-surrogate-value",
            one(meta.replace('"pt"', '"p\\udc00t"') + "," + A),
            "invalid-json",
            "metadata value with a lone low surrogate escape \\udc00",
        ),
        Invalid(
            "reversed-surrogates",
            one(meta.replace('"pt"', '"\\udc00\\ud800"') + "," + A),
            "invalid-json",
            "low then high surrogate escape (no pair)",
        ),
        Invalid("nan", extra_field("NaN"), "invalid-json", "NaN in an extra entry field"),
        Invalid("infinity", extra_field("-Infinity"), "invalid-json", "-Infinity in an extra entry field"),
        Invalid("float-out-of-range", extra_field("1e400"), "invalid-json", "1e400 (past f64) in an extra field"),
        Invalid("integer-out-of-range", extra_field("9" * 400), "invalid-json", "a 400-digit integer (past f64)"),
        Invalid(
            "float-near-max",
            extra_field("1.7976931348623158e308"),
            "invalid-json",
            "below f64's maximum, but serde_json's f64 arithmetic overflows on it",
        ),
        Invalid(
            "integer-near-max",
            extra_field("17976931348623157" + "0" * 292),
            "invalid-json",
            "a 309-digit integer that serde_json's f64 arithmetic overflows on",
        ),
        Invalid(
            "nesting-900",
            extra_field("[" * 900 + "]" * 900),
            "invalid-json",
            "900 nested arrays (deeper than Python's recursion limit allows a naive walk)",
        ),
        Invalid(
            "shape-nested-900",
            one(A.replace("[2,2]", "[" * 900 + "]" * 900)),
            "bad-shape",
            "a shape made of 900 nested arrays",
        ),
        Invalid(
            "nesting-128",
            extra_field("[" * 126 + "]" * 126),
            "invalid-json",
            "128 nested levels counting the top object (serde_json's limit)",
        ),
        # --- the top-level object
        Invalid(
            "duplicate-metadata",
            one(meta + "," + A + "," + meta),
            "duplicate-metadata",
            "__metadata__ twice",
        ),
        Invalid(
            "duplicate-metadata-escaped",
            one(meta + "," + A + ',"__metadata\\u005f_":null'),
            "duplicate-metadata",
            "__metadata__ twice, once spelled with a \\u escape",
        ),
        Invalid("metadata-value-null", one('"__metadata__":{"k":null},' + A), "bad-metadata-value", "value null"),
        Invalid("metadata-value-number", one('"__metadata__":{"k":1},' + A), "bad-metadata-value", "value 1"),
        Invalid("metadata-value-bool", one('"__metadata__":{"k":true},' + A), "bad-metadata-value", "value true"),
        Invalid("metadata-value-array", one('"__metadata__":{"k":["v"]},' + A), "bad-metadata-value", "value [..]"),
        Invalid(
            "metadata-value-object", one('"__metadata__":{"k":{"v":"w"}},' + A), "bad-metadata-value", "value {..}"
        ),
        Invalid("metadata-string", one('"__metadata__":"pt",' + A), "bad-metadata", "__metadata__ is a string"),
        Invalid("metadata-array", one('"__metadata__":[],' + A), "bad-metadata", "__metadata__ is an array"),
        # --- tensor entries
        Invalid("entry-not-object", one('"a":[0,16]'), "bad-entry", "a tensor entry that is an array"),
        Invalid("entry-null", one('"a":null'), "bad-entry", "a tensor entry that is null"),
        Invalid(
            "duplicate-field",
            one('"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16],"dtype":"F32"}'),
            "duplicate-field",
            "dtype twice in one entry",
        ),
        Invalid("missing-data-offsets", one('"a":{"dtype":"F32","shape":[2,2]}'), "missing-field", "no data_offsets"),
        Invalid("dtype-not-string", one(A.replace('"F32"', "32")), "bad-dtype", "dtype is a number"),
        Invalid("unknown-dtype", one(A.replace('"F32"', '"F128"')), "unknown-dtype", "dtype F128 does not exist"),
        Invalid("lowercase-dtype", one(A.replace('"F32"', '"f32"')), "unknown-dtype", "dtype f32 (case-sensitive)"),
        Invalid("dtype-torch-name", one(A.replace('"F32"', '"float32"')), "unknown-dtype", "torch dtype name"),
        Invalid("shape-not-list", one(A.replace("[2,2]", "4")), "bad-shape", "shape is a number"),
        Invalid("shape-negative", one(A.replace("[2,2]", "[-2,-2]")), "bad-shape", "negative dims (product 4)"),
        Invalid("shape-float", one(A.replace("[2,2]", "[2.0,2]")), "bad-shape", "a float dim 2.0"),
        Invalid("shape-bool", one(A.replace("[2,2]", "[true,4]")), "bad-shape", "a boolean dim"),
        Invalid(
            "shape-negative-zero",
            one(A.replace("[2,2]", "[-0,4]").replace("[0,16]", "[0,0]"), 0),
            "bad-shape",
            "dim -0 (a float)",
        ),
        Invalid(
            "shape-string-dim",
            one(A.replace("[2,2]", f'["2",{2**40}]')),
            "bad-shape",
            "a string dim beside a huge one (a naive product builds a string of 2**40 characters)",
        ),
        Invalid(
            "shape-past-u64",
            one(A.replace("[2,2]", f"[{U64_MAX + 1},0]").replace("[0,16]", "[0,0]"), 0),
            "bad-shape",
            "dim 2**64",
        ),
        Invalid("offsets-one-number", one(A.replace("[0,16]", "[16]")), "bad-offsets", "data_offsets of length 1"),
        Invalid("offsets-three-numbers", one(A.replace("[0,16]", "[0,16,16]")), "bad-offsets", "length 3"),
        Invalid("offsets-negative", one(A.replace("[0,16]", "[-16,0]")), "bad-offsets", "a negative offset"),
        Invalid("offsets-float", one(A.replace("[0,16]", "[0,16.0]")), "bad-offsets", "a float offset"),
        # --- offsets, sizes and the file length
        Invalid(
            "offsets-reversed",
            one(A + ',"b":{"dtype":"F32","shape":[2,2],"data_offsets":[16,0]}'),
            "invalid-offset",
            "second tensor ends before it begins",
        ),
        Invalid("offsets-not-at-zero", one(A.replace("[0,16]", "[8,24]"), 24), "invalid-offset", "first begins at 8"),
        Invalid(
            "offsets-hole",
            one(A + ',"b":{"dtype":"F32","shape":[2],"data_offsets":[24,32]}', 32),
            "invalid-offset",
            "8 unclaimed bytes between two tensors",
        ),
        Invalid(
            "offsets-overlap",
            one(A + ',"b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}', 24),
            "invalid-offset",
            "second tensor starts inside the first",
        ),
        Invalid("size-mismatch", one(A.replace("[2,2]", "[2,3]")), "size-mismatch", "F32 [2,3] in 16 bytes"),
        Invalid(
            "duplicate-name-last-wrong",
            one(A + ',"a":{"dtype":"F32","shape":[4,4],"data_offsets":[0,16]}'),
            "size-mismatch",
            "duplicate name: the last entry wins and its size is wrong",
        ),
        Invalid(
            "duplicate-name-first-bad-dtype",
            one(A.replace('"F32"', '"X"') + "," + A),
            "unknown-dtype",
            "duplicate name: the overridden entry still must be well-typed",
        ),
        Invalid(
            "overflow-zero-last",
            one(A.replace("[2,2]", f"[{2**40},{2**40},0]").replace("[0,16]", "[0,0]"), 0),
            "overflow",
            "[2**40, 2**40, 0]: the running product overflows before the 0",
        ),
        Invalid(
            "overflow-many-dims",
            one(A.replace("[2,2]", ",".join([str(U64_MAX)] * 64).join("[]")).replace("[0,16]", "[0,0]"), 0),
            "overflow",
            "64 dims of 2**64 - 1",
        ),
        Invalid(
            "overflow-bits",
            one(A.replace("[2,2]", f"[{2**59}]").replace("[0,16]", "[0,0]"), 0),
            "overflow",
            "F32 [2**59]: 2**64 bits",
        ),
        Invalid(
            "misaligned-f4",
            one('"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}', 2),
            "misaligned-slice",
            "F4 [3] is 12 bits, not whole bytes",
        ),
        Invalid(
            "misaligned-f6",
            one('"a":{"dtype":"F6_E3M2","shape":[2],"data_offsets":[0,2]}', 2),
            "misaligned-slice",
            "F6_E3M2 [2] is 12 bits, not whole bytes",
        ),
        Invalid("trailing-data", one(A, 17), "trailing-data", "one byte after the last tensor"),
        Invalid("missing-data", one(A, 15), "missing-data", "the last tensor is one byte short"),
        Invalid("header-only", one(A, 0), "missing-data", "the data region is missing entirely"),
        Invalid("sequence-too-long", one('"a":["F32",[2,2],[0,16],1]'), "bad-entry", "a 4-element sequence entry"),
        Invalid("sequence-too-short", one('"a":["F32",[2,2]]'), "bad-entry", "a 2-element sequence entry"),
        Invalid(
            "sequence-wrong-order", one('"a":[[2,2],"F32",[0,16]]'), "bad-dtype", "sequence entry not in field order"
        ),
        Invalid(
            "dtype-tagged-value",
            one(A.replace('"F32"', '{"F32":1}')),
            "bad-dtype",
            'a tagged dtype whose value is not null: {"F32":1}',
        ),
        Invalid(
            "dtype-tagged-two-keys",
            one(A.replace('"F32"', '{"F32":null,"F16":null}')),
            "bad-dtype",
            "a tagged dtype with two variants",
        ),
        Invalid("dtype-tagged-unknown", one(A.replace('"F32"', '{"f32":null}')), "unknown-dtype", "tagged, lower case"),
    ]
    return cases


def valid_cases() -> list[Valid]:
    """Return the tricky valid corpus (all accepted by the reference reader)."""
    every = {}
    position = 0
    # F4 needs an even count and the F6 dtypes a multiple of 4 elements to fill whole bytes.
    bits = {
        "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
        "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
        "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
    }  # fmt: skip
    for dtype, size in sorted(bits.items(), key=lambda item: (-item[1], item[0])):
        nbytes = 4 * 2 * size // 8
        every[f"t.{dtype.lower()}"] = entry(dtype, [4, 2], position, position + nbytes)
        position += nbytes
    unicode_names = {
        "modèle.poids": entry("F16", [2], 0, 4),
        "层.权重": entry("F16", [2], 4, 8),
        "emoji.😀": entry("U8", [3], 8, 11),
    }
    pair = "\\ud83d\\ude00"
    return [
        Valid("empty-header", blob("{}"), "the empty header {} with space padding", 0, 0),
        Valid("empty-header-unpadded", blob("{}", padded=False), "{} without padding (data unaligned)", 0, 0),
        Valid("metadata-null", one('"__metadata__":null,' + A), "__metadata__ is null", 1, 16),
        Valid(
            "metadata-not-first",
            one(A + ',"__metadata__":{"format":"pt"}'),
            "__metadata__ after the tensors",
            1,
            16,
            {"format": "pt"},
        ),
        Valid(
            "metadata-duplicate-key",
            one('"__metadata__":{"k":"1","k":"2"},' + A),
            "a key twice inside __metadata__: the last wins",
            1,
            16,
            {"k": "2"},
        ),
        Valid(
            "metadata-unicode",
            one('"__metadata__":{"k":"' + pair + ' caf\\u00e9 \\" \\\\ \\n","é":"ü"},' + A),
            "escapes, a surrogate pair and non-ASCII in metadata",
            1,
            16,
            {"k": '😀 café " \\ \n', "é": "ü"},
        ),
        Valid("leading-whitespace", blob(" \n\t\r{" + A + "}", 16), "whitespace before {", 1, 16),
        Valid(
            "trailing-whitespace", blob(b"{" + A.encode() + b"}\t\n\r\n  ", 16, padded=False), "tabs/newlines", 1, 16
        ),
        Valid(
            "zero-size-tensors",
            one(
                '"z":{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]},'
                '"y":{"dtype":"BF16","shape":[3,0],"data_offsets":[0,0]},'
                + A.replace('"a"', '"w"')
                + ',"h":{"dtype":"U8","shape":[18446744073709551615,0],"data_offsets":[16,16]}'
            ),
            "zero-size tensors (one with a 2**64-1 dim) around a real one",
            4,
            16,
        ),
        Valid(
            "scalars",
            one(
                '"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]},"t":{"dtype":"U8","shape":[],"data_offsets":[8,9]}',
                9,
            ),
            "scalars: shape []",
            2,
            9,
        ),
        Valid(
            "extra-entry-fields",
            extra_field(
                '{"note":"kept","n":[1,-0,2.5,1e300,' + "9" * 30 + ',null,true],"deep":' + "[" * 124 + "]" * 124 + "}"
            ),
            "unknown fields in an entry (nested 127 levels deep at most, -0, a 30-digit integer)",
            1,
            16,
        ),
        Valid(
            "duplicate-tensor-name",
            one(A.replace("[2,2]", "[9]") + "," + A),
            "a name twice: the first entry is inconsistent, the last wins and is consistent",
            1,
            16,
        ),
        Valid(
            "unsorted-offsets",
            one(
                '"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]},'
                + A
                + ',"c":{"dtype":"U8","shape":[8],"data_offsets":[24,32]}',
                32,
            ),
            "header order is not offset order",
            3,
            32,
        ),
        Valid("non-ascii-names", one(compact(unicode_names)[1:-1], 11), "non-ASCII tensor names", 3, 11),
        Valid("every-dtype", one(compact(every)[1:-1], position), "one tensor of every dtype", len(every), position),
        Valid(
            "numbers-at-the-edges",
            extra_field(
                "[1.7976931348623157e308,-1.797693134862315e308,"
                + "1797693134862315"
                + "0" * 293
                + ",1e-400,0e99999999999,-0.0,18446744073709551616,5e-324]"
            ),
            "numbers serde_json still reads: near f64's maximum, underflow to 0, a zero mantissa, 2**64",
            1,
            16,
        ),
        Valid(
            "many-dims",
            one(A.replace("[2,2]", "[" + ",".join(["1"] * 40) + ",2,2]")),
            "a shape of 42 dims (40 of them 1)",
            1,
            16,
        ),
        Valid("unpadded", blob("{" + A + "}", 16, padded=False), "no padding: data region unaligned", 1, 16),
        Valid(
            "sequence-entries",
            one(
                '"__metadata__":{"format":"pt"},"a":["F32",[2,2],[0,16]],'
                '"b":[ "U8" , [8] , [16,24] ],"c":[{"F16":null},[4],[24,32]]',
                32,
            ),
            "tensor entries as [dtype, shape, data_offsets] (serde reads a struct from a sequence)",
            3,
            32,
            {"format": "pt"},
        ),
        Valid(
            "dtype-tagged",
            one(
                '"a":{"dtype":{"F32":null},"shape":[2,2],"data_offsets":[0,16]},'
                '"b":{"shape":[4],"dtype":{ "BF16" : null },"data_offsets":[16,24]}',
                24,
            ),
            'dtypes in serde\'s externally tagged form {"F32":null}',
            2,
            24,
        ),
    ]


def write(out: Path) -> int:
    """Write both corpora under ``out`` (``invalid/`` and ``valid/``); return the number of files."""
    count = 0
    for sub, cases in (("invalid", invalid_cases()), ("valid", valid_cases())):
        folder = out / sub
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.safetensors"):
            stale.unlink()
        manifest: dict[str, dict[str, object]] = {}
        for case in cases:
            file_name = f"{case.name}.safetensors"
            if file_name in manifest:
                raise SystemExit(f"duplicate fixture name {file_name}")
            (folder / file_name).write_bytes(case.blob)
            if isinstance(case, Invalid):
                manifest[file_name] = {"code": case.code, "description": case.description}
            else:
                manifest[file_name] = {
                    "description": case.description,
                    "tensors": case.tensors,
                    "data_len": case.data_len,
                    "metadata": case.metadata,
                }
            count += 1
        text = json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        (folder / "MANIFEST.json").write_text(text, encoding="utf-8")
    return count


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and write the corpus."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures", help="fixtures folder")
    args = parser.parse_args(argv)
    count = write(args.out)
    print(f"wrote {count} fixtures under {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
