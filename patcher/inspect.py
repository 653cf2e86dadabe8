"""Read what a converted file is off its tensor table alone (pure: a :class:`Header` in, an :class:`Inference` out).

The rules are those of nunchaku-contract.md section 4. One pass over the names sorts the few tensors that
matter (``qweight``, ``wscales``, the low-rank branch, 8-bit float dtypes, block indices); every later check
works on those small collections. Each conclusion is a :class:`Fact` carrying the tensors that support it;
anything the table says against itself goes to ``Inference.contradictions``, one line per kind of problem.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from operator import itemgetter
from typing import Any

from ._record import dataclass
from .facts import Fact, Family, Inference, Precision
from .header import Header, TensorInfo
from .models import describe_layout

#: Group size of the W4A4 weight scales for each precision (contract section 3).
GROUP_SIZE: Mapping[Precision, int] = {"int4": 64, "nvfp4": 16}
#: Dtypes whose presence means nvfp4 (merge_safetensors counts all of them, not only F8_E4M3).
F8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
#: Diffusers ``in_channels`` of the FLUX.1 variants, read off ``x_embedder.weight`` (contract section 4).
FLUX_VARIANTS: Mapping[int, str] = {
    64: "dev, schnell, Kontext, Krea, shuttle-jaguar",
    128: "Canny, Depth",
    384: "Fill",
}
#: How many tensor names a Fact keeps as evidence.
EVIDENCE = 3

_DOWN = {"lora_down": "lora", "proj_down": "proj"}
_UP = {"lora_up": "lora", "proj_up": "proj"}
#: The leaf names the scan sorts, by kind: q(weight), s(cales), d(own), u(p), t(ensor/channel scales).
_LEAF_KIND = {
    "qweight": "q",
    "wscales": "s",
    **dict.fromkeys(_DOWN, "d"),
    **dict.fromkeys(_UP, "u"),
    "wtscale": "t",
    "wcscales": "t",
}
#: Top-level containers whose second name component is a block index.
_CONTAINERS = frozenset(
    {"transformer_blocks", "single_transformer_blocks", "layers", "noise_refiner", "context_refiner"}
)
_REFINERS = ("noise_refiner.", "context_refiner.")
_UNET_PARTS = ("down_blocks.", "mid_block.", "up_blocks.")
_ZIMAGE_EMBEDDER = re.compile(r"all_x_embedder\.(\d+)-(\d+)\.weight")
#: An SDXL UNet transformer block: ``{down_blocks.N | mid_block | up_blocks.N}.attentions.A.transformer_blocks.T``.
_UNET_BLOCK = re.compile(
    r"((?:down|up)_blocks\.(\d+)|mid_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(.+?)\.?$"
)
#: Group sizes nunchaku's T5 ``W4Linear`` (TinyChat packing) can have; its loader builds every layer with 128.
T5_GROUP_SIZES = (128, 64, 32)
T5_LOADER_GROUP_SIZE = 128


class _Problems:
    """Contradictions grouped by kind: each kind becomes one line with a count and the first example."""

    def __init__(self) -> None:
        self._kinds: dict[str, list[str]] = {}

    def add(self, kind: str, example: str) -> None:
        self._kinds.setdefault(kind, []).append(example)

    def lines(self) -> tuple[str, ...]:
        out = []
        for kind, examples in self._kinds.items():
            if len(examples) == 1:
                out.append(f"{kind}: {examples[0]}")
            else:
                out.append(f"{kind} in {len(examples)} places, e.g. {examples[0]}")
        return tuple(out)


@dataclass
class _Scan:
    """What the single pass over the names collected."""

    qweights: dict[str, TensorInfo]
    wscales: dict[str, TensorInfo]
    downs: dict[str, tuple[str, TensorInfo]]
    ups: dict[str, tuple[str, TensorInfo]]
    scale_names: list[str]  # wtscale / wcscales
    f8_names: list[str]
    f8_dtypes: frozenset[str]
    blocks: dict[str, dict[str, str]]  # container -> block index -> first tensor name seen
    t5_blocks: dict[str, str]


def _block_index(heads: Iterable[str], depth_from: int = 0) -> dict[str, str]:
    """Map each ``container.index`` prefix (counted from ``depth_from``) to the first head under it."""
    out: dict[str, str] = {}
    for head in heads:
        dot = head.find(".", depth_from)
        end = head.find(".", dot + 1) if dot >= 0 else -1
        key = head[:end] if end >= 0 else head  # "transformer_blocks.0" itself heads a block tensor
        if key not in out:
            out[key] = head
    return out


def _scan(tensors: Mapping[str, TensorInfo]) -> _Scan:
    qweights: dict[str, TensorInfo] = {}
    wscales: dict[str, TensorInfo] = {}
    downs: dict[str, tuple[str, TensorInfo]] = {}
    ups: dict[str, tuple[str, TensorInfo]] = {}
    scale_names: list[str] = []
    names = list(tensors)
    infos = list(tensors.values())
    # The per-name work is one rpartition; the loop below only dispatches on the leaf name.
    parts = [name.rpartition(".") for name in names]
    for (head, _, leaf), name, info in zip(parts, names, infos, strict=True):
        kind = _LEAF_KIND.get(leaf)
        if kind is None:
            continue
        if kind == "q":
            qweights[head] = info
        elif kind == "s":
            wscales[head] = info
        elif kind == "d":
            downs[head] = (name, info)
        elif kind == "u":
            ups[head] = (name, info)
        else:
            scale_names.append(name)
    f8_dtypes = F8_DTYPES.intersection({info.dtype for info in infos})
    f8_names = [n for n, info in zip(names, infos, strict=True) if info.dtype in f8_dtypes] if f8_dtypes else []
    # Block indices come from the distinct module paths (a few hundred), not from every tensor name.
    heads = dict.fromkeys(map(itemgetter(0), parts))
    heads_of = {head: name for (head, _, _), name in zip(reversed(parts), reversed(names), strict=True)}
    blocks: dict[str, dict[str, str]] = {}
    for key, head in _block_index(heads).items():
        container, _, index = key.partition(".")
        if container in _CONTAINERS:
            blocks.setdefault(container, {})[index] = heads_of[head]
    t5_blocks: dict[str, str] = {}
    t5_heads = [h for h in heads if h.startswith("encoder.block.")]
    if t5_heads:
        for key, head in _block_index(t5_heads, len("encoder.")).items():
            t5_blocks[key.rpartition(".")[2]] = heads_of[head]
    return _Scan(qweights, wscales, downs, ups, scale_names, f8_names, f8_dtypes, blocks, t5_blocks)


def _first(names: Iterable[str], limit: int = EVIDENCE) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        out.append(name)
        if len(out) == limit:
            break
    return tuple(out)


def _shape(info: TensorInfo) -> str:
    return f"{info.dtype} {list(info.shape)}"


# --------------------------------------------------------------------------------------------
# Family


def _family_candidates(scan: _Scan) -> dict[Family, tuple[str, str]]:
    """Return each family the quantized layers fit, with one tensor that says so and how."""
    found: dict[Family, tuple[str, str]] = {}
    flux_double: tuple[str, str] | None = None
    has_single = "single_transformer_blocks" in scan.blocks
    for head, info in scan.qweights.items():
        name = f"{head}.qweight"
        if head.startswith("single_transformer_blocks."):
            if head.endswith((".qkv_proj", ".mlp_fc1", ".attn.to_qkv", ".proj_mlp")):
                found.setdefault(Family.FLUX, (name, "single_transformer_blocks with a quantized qkv/mlp layer"))
        elif head.startswith("transformer_blocks."):
            if head.endswith((".qkv_proj_context", ".mlp_context_fc1", ".norm1_context.linear")):
                # deepcompressor's Flux double-block names: enough to tell Flux even without single blocks.
                flux_double = flux_double or (name, "Flux double blocks (qkv_proj_context / norm1_context)")
            elif head.endswith((".img_mod.1", ".txt_mod.1")):
                found.setdefault(Family.QWEN_IMAGE, (name, "img_mod.1 / txt_mod.1 modulation layers"))
            elif head.endswith((".attn.to_qkv", ".attn.add_qkv_proj")) and not has_single:
                found.setdefault(Family.QWEN_IMAGE, (name, "attn.to_qkv without single blocks"))
            elif head.endswith((".cross_attn.q_linear", ".ff.inverted_conv", ".ff.point_conv")):
                # nunchaku's C++ SanaModel names: linear attention + cross attention + GLU-MBConv feed-forward.
                found.setdefault(Family.SANA, (name, "cross_attn.q_linear / ff.inverted_conv (SANA blocks)"))
        elif head.startswith(("layers.", *_REFINERS)):
            if head.endswith(".attention.to_qkv"):
                found.setdefault(Family.Z_IMAGE, (name, "layers.N.attention.to_qkv / refiner blocks"))
        elif head.startswith(_UNET_PARTS):
            # SDXL UNet: transformer blocks sit inside the UNet's down/mid/up blocks, self-attention fused.
            if ".transformer_blocks." in head and head.endswith(".attn1.to_qkv"):
                found.setdefault(Family.SDXL, (name, "UNet transformer blocks with attn1.to_qkv"))
        elif head.startswith("encoder.block.") and info.dtype == "I16":
            # nunchaku's T5 encoder: TinyChat W4Linear (int16-packed qweight) under Hugging Face T5 names.
            found.setdefault(Family.T5, (name, "encoder.block.N T5 layers with int16-packed AWQ weights"))
    if flux_double is not None and Family.FLUX not in found:
        found[Family.FLUX] = flux_double
    return found


# --------------------------------------------------------------------------------------------
# Precision, group size, rank


def _precision(scan: _Scan, w4a4: Mapping[str, TensorInfo], problems: _Problems) -> Fact[Precision] | None:
    if not w4a4:
        return None
    if scan.f8_names:
        confirm = scan.scale_names[:1]
        note = f"{len(scan.f8_names)} tensor(s) with an 8-bit float dtype ({', '.join(sorted(scan.f8_dtypes))})"
        note += "; wtscale/wcscales present" if confirm else "; no wtscale/wcscales to confirm it"
        return Fact("nvfp4", _first([*scan.f8_names[:2], *confirm]), note)
    for name in scan.scale_names[:1]:
        problems.add("wtscale/wcscales in an int4 file (no 8-bit float scales)", name)
    head = next(iter(w4a4))
    scales = scan.wscales.get(head)
    evidence = (f"{head}.wscales",) if scales is not None else (f"{head}.qweight",)
    dtype = scales.dtype if scales is not None else "?"
    return Fact("int4", evidence, f"no 8-bit float tensor; W4A4 wscales are {dtype}")


def _group_size(
    scan: _Scan, w4a4: Mapping[str, TensorInfo], precision: Fact[Precision] | None, problems: _Problems
) -> Fact[int] | None:
    sizes: dict[int, list[str]] = {}
    scale_dtypes: dict[str, list[str]] = {}
    for head, qweight in w4a4.items():
        scales = scan.wscales.get(head)
        if scales is None:
            problems.add("W4A4 layer without wscales", f"{head}.qweight")
            continue
        name = f"{head}.wscales"
        if len(qweight.shape) != 2 or len(scales.shape) != 2:
            problems.add("W4A4 qweight/wscales not 2-D", f"{head} ({_shape(qweight)}, {_shape(scales)})")
            continue
        scale_dtypes.setdefault(scales.dtype, []).append(name)
        if scales.shape[1] != qweight.shape[0]:
            problems.add(
                "wscales.shape[1] != qweight.shape[0]", f"{head} (qweight {_shape(qweight)}, wscales {_shape(scales)})"
            )
        columns = 2 * qweight.shape[1]
        if scales.shape[0] == 0 or columns % scales.shape[0]:
            problems.add(
                "2*qweight.shape[1] is no multiple of wscales.shape[0]", f"{head} ({columns} / {scales.shape[0]})"
            )
            continue
        sizes.setdefault(columns // scales.shape[0], []).append(name)
    if len(scale_dtypes) > 1:
        parts = ", ".join(f"{dtype} ({len(names)} layers, e.g. {names[0]})" for dtype, names in scale_dtypes.items())
        problems.add("W4A4 wscales mix dtypes", parts)
    if not sizes:
        return None
    if len(sizes) > 1:
        parts = ", ".join(f"{size} ({len(names)} layers, e.g. {names[0]})" for size, names in sorted(sizes.items()))
        problems.add("mixed group sizes", parts)
        return None
    ((size, names),) = sizes.items()
    if precision is not None and size != GROUP_SIZE[precision.value]:
        kind = "F8 scales" if precision.value == "nvfp4" else "16-bit scales"
        problems.add(
            f"{kind} with group size {size}",
            f"{names[0]} (expected {GROUP_SIZE[precision.value]} for {precision.value})",
        )
    note = f"2*qweight.shape[1] / wscales.shape[0] = {size} over {len(names)} W4A4 layer(s) (AWQ layers excluded)"
    return Fact(size, _first(names), note)


def _rank(scan: _Scan, awq_heads: set[str], problems: _Problems) -> Fact[int] | None:
    ranks: dict[int, list[str]] = {}
    namings: Counter[str] = Counter()
    for head, (name, down) in scan.downs.items():
        if head in awq_heads:
            continue  # GEMV_AWQ's optional LoRA is laid out [rank, ic]: not the SVDQuant branch
        namings[_DOWN[name.rpartition(".")[2]]] += 1
        if len(down.shape) != 2:
            problems.add("low-rank down projection not 2-D", f"{name} {_shape(down)}")
            continue
        rank = down.shape[1]
        ranks.setdefault(rank, []).append(name)
        up_entry = scan.ups.get(head)
        if up_entry is None:
            problems.add("down projection without up projection", name)
        else:
            up_name, up = up_entry
            if len(up.shape) != 2 or up.shape[1] != rank:
                problems.add("down/up ranks disagree", f"{name} {_shape(down)} vs {up_name} {_shape(up)}")
        qweight = scan.qweights.get(head)
        if qweight is not None and len(qweight.shape) == 2:
            if down.shape[0] != 2 * qweight.shape[1]:
                problems.add(
                    "down.shape[0] != 2*qweight.shape[1]", f"{name} {_shape(down)} vs qweight {_shape(qweight)}"
                )
            if up_entry is not None and up_entry[1].shape[:1] != qweight.shape[:1]:
                problems.add(
                    "up.shape[0] != qweight.shape[0]",
                    f"{up_entry[0]} {_shape(up_entry[1])} vs qweight {_shape(qweight)}",
                )
    for head, (name, _) in scan.ups.items():
        if head not in scan.downs and head not in awq_heads:
            problems.add("up projection without down projection", name)
    if len(namings) > 1:
        problems.add("mixed low-rank naming", ", ".join(f"{k}_down ({n} layers)" for k, n in namings.items()))
    if not ranks:
        return None
    if len(ranks) > 1:
        parts = ", ".join(f"{rank} ({len(names)} layers, e.g. {names[0]})" for rank, names in sorted(ranks.items()))
        problems.add("mixed ranks", parts)
        return None
    ((rank, names),) = ranks.items()
    if rank % 16:
        problems.add("rank is not a multiple of 16", f"{rank} ({names[0]})")
    suffix = names[0].rpartition(".")[2]
    note = f"shape[1] of {len(names)} {suffix} tensor(s), checked against the up projections and qweight"
    return Fact(rank, _first(names), note)


# --------------------------------------------------------------------------------------------
# Structure: block counts, widths, variant evidence


def _count_blocks(seen: Mapping[str, str] | None, label: str, note: str, problems: _Problems) -> Fact[int] | None:
    if not seen:
        return None
    numeric = {int(i): name for i, name in seen.items() if i.isdigit()}
    if len(numeric) != len(seen):
        problems.add(f"{label} index not a plain number", next(n for i, n in seen.items() if not i.isdigit()))
    indices = sorted(numeric)
    if indices and indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        problems.add(f"{label} indices are not contiguous", f"missing {missing[:5]} (highest {indices[-1]})")
    evidence = [numeric[indices[0]], numeric[indices[-1]]] if indices else list(seen.values())[:1]
    return Fact(len(seen), tuple(dict.fromkeys(evidence)), f"{len(seen)} distinct {note} indices")


def _fused_width(
    qweights: Mapping[str, TensorInfo], suffixes: tuple[str, ...], problems: _Problems
) -> Fact[int] | None:
    widths: dict[int, list[str]] = {}
    for head, info in qweights.items():
        if head.endswith(suffixes) and info.shape:
            widths.setdefault(info.shape[0] // 3, []).append(f"{head}.qweight")
    if not widths:
        return None
    if len(widths) > 1:
        parts = ", ".join(f"{w} ({len(n)} layers, e.g. {n[0]})" for w, n in sorted(widths.items()))
        problems.add("fused qkv layers disagree on the hidden size", parts)
        return None
    ((width, names),) = widths.items()
    return Fact(width, _first(names), f"qweight.shape[0] / 3 of {len(names)} fused qkv layer(s)")


def _tensor_width(tensors: Mapping[str, TensorInfo], name: str, axis: int, note: str) -> Fact[int] | None:
    info = tensors.get(name)
    if info is None or len(info.shape) <= axis:
        return None
    return Fact(info.shape[axis], (name,), f"{name} {_shape(info)}: {note}")


def _in_channels(family: Family, tensors: Mapping[str, TensorInfo], problems: _Problems) -> Fact[int] | None:
    if family is Family.FLUX:
        fact = _tensor_width(tensors, "x_embedder.weight", 1, "shape[1]")
        if fact is not None:
            variant = FLUX_VARIANTS.get(fact.value, "no known FLUX.1 variant")
            return Fact(fact.value, fact.evidence, f"{fact.note} -> in_channels {fact.value} ({variant})")
        return None
    if family is Family.QWEN_IMAGE:
        return _tensor_width(tensors, "img_in.weight", 1, "shape[1]")
    if family is Family.SANA:
        return _tensor_width(tensors, "patch_embed.proj.weight", 1, "shape[1]")
    if family is Family.SDXL:
        return _tensor_width(tensors, "conv_in.weight", 1, "shape[1]")
    if family is Family.Z_IMAGE:
        # The embedder's key names its patch sizes: all_x_embedder.{patch}-{frame patch}.
        for name, info in tensors.items():
            match = _ZIMAGE_EMBEDDER.fullmatch(name) if name.startswith("all_x_embedder.") else None
            if match is None or len(info.shape) != 2:
                continue
            patch, frames = int(match[1]), int(match[2])
            tokens = patch * patch * frames
            if tokens == 0 or info.shape[1] % tokens:
                problems.add("all_x_embedder width is not a multiple of its patch volume", f"{name} {_shape(info)}")
                return None
            value = info.shape[1] // tokens
            return Fact(value, (name,), f"{name} {_shape(info)}: shape[1] / ({patch}*{patch}*{frames}) = {value}")
    return None


def _guidance(tensors: Mapping[str, TensorInfo]) -> Fact[bool] | None:
    timestep = "time_text_embed.timestep_embedder.linear_1.weight"
    if timestep not in tensors:
        return None  # the unquantized layers are not in the file: the header cannot tell
    guidance = "time_text_embed.guidance_embedder.linear_1.weight"
    if guidance in tensors:
        return Fact(True, (guidance,), "time_text_embed.guidance_embedder present: guidance-distilled (dev-like)")
    return Fact(False, (timestep,), "time_text_embed.guidance_embedder absent: schnell-like")


def _hidden_size(
    family: Family, scan: _Scan, tensors: Mapping[str, TensorInfo], problems: _Problems
) -> Fact[int] | None:
    if family is Family.FLUX:
        return _fused_width(scan.qweights, (".qkv_proj", ".qkv_proj_context"), problems)
    if family is Family.QWEN_IMAGE:
        return _fused_width(scan.qweights, (".attn.to_qkv", ".attn.add_qkv_proj"), problems)
    if family is Family.Z_IMAGE:
        return _fused_width(scan.qweights, (".attention.to_qkv",), problems)
    if family is Family.SANA:
        # SANA's 2240 is padded to 2304 in the quantized layers: the per-block modulation table is exact.
        return _tensor_width(tensors, "transformer_blocks.0.scale_shift_table", 1, "shape[1]")
    if family is Family.T5:
        return _tensor_width(tensors, "encoder.block.0.layer.0.SelfAttention.q.qweight", 1, "shape[1] (d_model)")
    return None  # SDXL: a UNet has several widths


def _skip_refiners(scan: _Scan, tensors: Mapping[str, TensorInfo]) -> Fact[bool]:
    quantized = [f"{h}.qweight" for h in scan.qweights if h.startswith(_REFINERS) and h.endswith(".attention.to_qkv")]
    if quantized:
        return Fact(False, _first(quantized), f"{len(quantized)} refiner block(s) have a quantized attention.to_qkv")
    plain = _first(n for n in tensors if n.startswith(_REFINERS))
    where = "refiners kept in 16 bits" if plain else "no refiner tensors in the file"
    return Fact(True, plain, f"no refiner block has a quantized attention.to_qkv ({where})")


def _unet_layout(
    scan: _Scan, tensors: Mapping[str, TensorInfo], problems: _Problems
) -> tuple[Fact[tuple[tuple[str, int, int], ...]] | None, Fact[int] | None]:
    """Return the SDXL UNet's transformer-block layout and their total, with the quantized layers as the note."""
    depths: dict[tuple[str, int], set[int]] = {}
    first: dict[str, str] = {}
    for name in tensors:
        match = _UNET_BLOCK.match(name) if ".transformer_blocks." in name else None
        if match is None:
            continue
        block = match[1]
        depths.setdefault((block, int(match[3])), set()).add(int(match[4]))
        first.setdefault(block, name)
    if not depths:
        return None, None
    blocks: dict[str, list[int]] = {}
    for (block, _attention), seen in sorted(depths.items()):
        if seen != set(range(len(seen))):
            problems.add("UNet transformer block indices are not contiguous", f"{block}: {sorted(seen)[:5]}")
        blocks.setdefault(block, []).append(len(seen))

    def order(block: str) -> tuple[int, int]:
        part, _, index = block.partition(".")
        return ({"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[part], int(index or 0))

    layout: list[tuple[str, int, int]] = []
    for block in sorted(blocks, key=order):
        per = blocks[block]
        if len(set(per)) > 1:
            problems.add("UNet attentions of one block differ in depth", f"{block}: {per}")
        layout.append((block, len(per), max(per)))
    # the layer path inside a transformer block, e.g. "attn1.to_qkv" from "...transformer_blocks.0.attn1.to_qkv.qweight"
    kinds = sorted({m[5] for head in scan.qweights if (m := _UNET_BLOCK.match(f"{head}.")) is not None})
    total = sum(attentions * depth for _, attentions, depth in layout)
    note = f"attentions x transformer blocks; quantized in each block: {', '.join(kinds) or 'nothing'}"
    evidence = tuple(first[b] for b, _, _ in layout)[:EVIDENCE]
    return (
        Fact(tuple(layout), evidence, note),
        Fact(total, evidence, f"{total} transformer blocks in the UNet's cross-attention blocks"),
    )


def _t5_awq(tensors: Mapping[str, TensorInfo], problems: _Problems) -> tuple[Fact[Precision], Fact[int] | None]:
    """Return the T5 encoder's precision (AWQ W4A16 int4) and group size, read off its ``W4Linear`` layers."""
    heads = [n[: -len(".qweight")] for n, i in tensors.items() if n.endswith(".qweight") and i.dtype == "I16"]
    sizes: dict[int, list[str]] = {}
    for head in heads:
        qweight, scales = tensors[f"{head}.qweight"], tensors.get(f"{head}.scales")
        if scales is None or len(qweight.shape) != 2 or len(scales.shape) != 2:
            problems.add("AWQ layer without 2-D scales", f"{head}.qweight")
            continue
        in_features, rows = qweight.shape[1], scales.shape[0]
        # TinyChat pads the group count to whole int32 packs (of 8 groups; 2 or 4 packs at a time below 128).
        fits = [g for g in T5_GROUP_SIZES if in_features % g == 0 and _tinychat_groups(in_features, g) == rows]
        if len(fits) != 1:
            problems.add(
                "AWQ scales fit no single group size", f"{head}.scales {_shape(scales)} for {in_features} inputs"
            )
            continue
        sizes.setdefault(fits[0], []).append(f"{head}.scales")
    note = f"AWQ W4A16: {len(heads)} int16-packed 4-bit weight layer(s) (TinyChat W4Linear), 16-bit activations"
    precision: Fact[Precision] = Fact("int4", _first(f"{h}.qweight" for h in heads), note)
    if len(sizes) > 1:
        parts = ", ".join(f"{g} ({len(n)} layers, e.g. {n[0]})" for g, n in sorted(sizes.items()))
        problems.add("mixed AWQ group sizes", parts)
        return precision, None
    if not sizes:
        return precision, None
    ((group, names),) = sizes.items()
    return precision, Fact(group, _first(names), f"inputs / scales.shape[0] (TinyChat-padded) of {len(names)} layer(s)")


def _tinychat_groups(in_features: int, group: int) -> int:
    """Return the padded group count nunchaku's T5 ``W4Linear`` allocates (``ceil_num_groups``)."""
    packs = -(-(in_features // group) // 8)
    factor = 1 if group >= 128 else 128 // group
    return -(-packs // factor) * factor * 8


#: The input embedder whose output width must equal the hidden size read off the quantized layers.
_EMBEDDER: Mapping[Family, str] = {
    Family.FLUX: "x_embedder.weight",
    Family.QWEN_IMAGE: "img_in.weight",
    Family.SANA: "patch_embed.proj.weight",
}

_UNQUANTIZED_MARKERS: Mapping[Family, tuple[str, ...]] = {
    Family.FLUX: ("x_embedder.weight", "time_text_embed.timestep_embedder.linear_1.weight", "proj_out.weight"),
    Family.QWEN_IMAGE: ("img_in.weight", "txt_in.weight", "proj_out.weight"),
    Family.Z_IMAGE: ("t_embedder.mlp.0.weight", "cap_embedder.1.weight"),
    Family.SANA: ("patch_embed.proj.weight", "proj_out.weight"),
    Family.SDXL: ("conv_in.weight", "conv_out.weight"),
    Family.T5: ("shared.weight", "encoder.embed_tokens.weight", "encoder.final_layer_norm.weight"),
}


#: The unquantized layers each family's loaders need from the file (a tensor ``NAME`` or ``NAME.*``): without
#: them Flux's V2 class fails (AssertionError converting the missing keys) and V1 leaves them uninitialised
#: (nunchaku-contract.md section 8). Flux's ``time_text_embed.guidance_embedder`` is needed too when the config
#: has ``guidance_embeds`` (checked against the config, see ``contract``).
REQUIRED_UNQUANTIZED: Mapping[Family, tuple[str, ...]] = {
    Family.FLUX: (
        "x_embedder",
        "context_embedder",
        "time_text_embed.timestep_embedder",
        "time_text_embed.text_embedder",
        "norm_out.linear",
        "proj_out",
    ),
    Family.QWEN_IMAGE: (
        "img_in",
        "txt_norm",
        "txt_in",
        "time_text_embed.timestep_embedder",
        "norm_out.linear",
        "proj_out",
    ),
    Family.Z_IMAGE: ("all_x_embedder", "all_final_layer", "t_embedder", "cap_embedder", "x_pad_token", "cap_pad_token"),
    Family.SANA: ("patch_embed.proj", "time_embed", "caption_projection", "scale_shift_table", "proj_out"),
}


def missing_unquantized(family: Family | None, tensors: Mapping[str, TensorInfo]) -> tuple[str, ...]:
    """Return the family's required unquantized layers (:data:`REQUIRED_UNQUANTIZED`) absent from ``tensors``.

    A layer is there when the table has the tensor itself or any tensor below it (``module.*``).
    """
    if family is None:
        return ()
    # The common case without a scan: the module or its weight by name. The rest in one pass over the names.
    unseen = [m for m in REQUIRED_UNQUANTIZED.get(family, ()) if m not in tensors and f"{m}.weight" not in tensors]
    if unseen:
        belows = tuple(module + "." for module in unseen)
        found = {below for name in tensors if name.startswith(belows) for below in belows if name.startswith(below)}
        unseen = [module for module, below in zip(unseen, belows, strict=True) if below not in found]
    return tuple(unseen)


def _has_unquantized(family: Family | None, tensors: Mapping[str, TensorInfo]) -> bool:
    if family is None:
        return False
    if family is Family.Z_IMAGE and any(n.startswith("all_x_embedder.") for n in tensors):
        return True
    return any(name in tensors for name in _UNQUANTIZED_MARKERS[family])


# --------------------------------------------------------------------------------------------
# Entry point


def infer(header: Header) -> Inference:
    """Read family, precision, rank, group size and structure off the header's tensor table."""
    return infer_tensors(header.tensors)


def infer_tensors(tensors: Mapping[str, TensorInfo]) -> Inference:
    """Do :func:`infer` on a bare tensor table."""
    problems = _Problems()
    scan = _scan(tensors)
    w4a4 = {head: info for head, info in scan.qweights.items() if info.dtype == "I8"}
    awq_heads = {head for head, info in scan.qweights.items() if info.dtype == "I32"}

    candidates = _family_candidates(scan)
    family: Fact[Family] | None = None
    if len(candidates) == 1:
        ((value, (name, how)),) = candidates.items()
        family = Fact(value, (name,), how)
    elif candidates:
        parts = ", ".join(f"{f.value} ({name})" for f, (name, _) in candidates.items())
        problems.add("tensor names fit several families", parts)

    precision = _precision(scan, w4a4, problems)
    group_size = _group_size(scan, w4a4, precision, problems)
    rank = _rank(scan, awq_heads, problems)
    t5_awq = family is not None and family.value is Family.T5
    if t5_awq:
        precision, group_size = _t5_awq(tensors, problems)

    num_layers: Fact[int] | None = None
    num_single_layers: Fact[int] | None = None
    guidance: Fact[bool] | None = None
    skip_refiners: Fact[bool] | None = None
    in_channels: Fact[int] | None = None
    hidden: Fact[int] | None = None
    unet_layout: Fact[tuple[tuple[str, int, int], ...]] | None = None
    if family is not None:
        fam = family.value
        blocks = scan.blocks
        if fam is Family.FLUX:
            num_layers = _count_blocks(blocks.get("transformer_blocks"), "double block", "transformer_blocks", problems)
            num_single_layers = _count_blocks(
                blocks.get("single_transformer_blocks"), "single block", "single_transformer_blocks", problems
            )
            guidance = _guidance(tensors)
        elif fam in (Family.QWEN_IMAGE, Family.SANA):
            num_layers = _count_blocks(blocks.get("transformer_blocks"), "block", "transformer_blocks", problems)
        elif fam is Family.Z_IMAGE:
            num_layers = _count_blocks(blocks.get("layers"), "layer", "layers", problems)
            skip_refiners = _skip_refiners(scan, tensors)
        elif fam is Family.T5:
            num_layers = _count_blocks(scan.t5_blocks, "encoder block", "encoder.block", problems)
        elif fam is Family.SDXL:
            unet_layout, num_layers = _unet_layout(scan, tensors, problems)
        in_channels = _in_channels(fam, tensors, problems)
        hidden = _hidden_size(fam, scan, tensors, problems)
        embedder = tensors.get(_EMBEDDER.get(fam, ""))
        if hidden is not None and embedder is not None and embedder.shape[:1] != (hidden.value,):
            problems.add(
                "input embedder width disagrees with the hidden size",
                f"{_EMBEDDER[fam]} {_shape(embedder)} vs {hidden.value} ({hidden.evidence[0]})",
            )

    return Inference(
        family=family,
        precision=precision,
        rank=rank,
        group_size=group_size,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        in_channels=in_channels,
        guidance_embeds=guidance,
        hidden_size=hidden,
        skip_refiners=skip_refiners,
        unet_layout=unet_layout,
        has_unquantized=_has_unquantized(family.value if family else None, tensors),
        missing_unquantized=missing_unquantized(family.value if family else None, tensors),
        quantized=bool(w4a4) or t5_awq,
        contradictions=problems.lines(),
    )


# --------------------------------------------------------------------------------------------
# File name hints


@dataclass(frozen=True)
class FileHints:
    """What a file name says (``svdq-int4_r32-flux.1-dev``): weak evidence, used only to break ties."""

    precision: Precision | None = None
    rank: int | None = None
    #: The model short name as written (``flux.1-dev``, ``qwen-image-lightningv1.0-4steps``), lower-cased.
    model: str | None = None
    #: The path component the hints came from.
    source: str | None = None


_HINT = re.compile(r"(?:^|[^a-z0-9])(?P<method>svdq|awq)-(?P<prec>int4|nvfp4|fp4)(?:_r(?P<rank>\d+))?-(?P<model>.+)$")
_EXTENSIONS = (".safetensors", ".sft")


def filename_hints(name: str) -> FileHints:
    """Return the precision, rank and model short name a path's components spell, if any."""
    parts = [p for p in re.split(r"[\\/]", name) if p]
    for part in reversed(parts):
        text = part.lower()
        for ext in _EXTENSIONS:
            if text.endswith(ext):
                text = text[: -len(ext)]
        if text.startswith("models--"):
            text = text.rpartition("--")[2]  # Hugging Face cache folder: models--org--name
        match = _HINT.search(text)
        if match is None:
            continue
        prec = match["prec"]
        precision: Precision | None = None
        if match["method"] == "svdq":
            precision = "int4" if prec == "int4" else "nvfp4"
        rank = int(match["rank"]) if match["rank"] else None
        return FileHints(precision=precision, rank=rank, model=match["model"], source=part)
    return FileHints()


# --------------------------------------------------------------------------------------------
# Human summary


def _line(label: str, fact: Fact[Any] | None) -> str:
    if fact is None:
        return f"{label}: unknown"
    value = fact.value.value if isinstance(fact.value, Family) else fact.value
    if isinstance(value, tuple):  # the UNet layout
        value = describe_layout(value)
    text = f"{label}: {value}"
    if fact.note:
        text += f" ({fact.note})"
    if fact.evidence:
        text += f" [{', '.join(fact.evidence)}]"
    return text


def describe(inference: Inference) -> list[str]:
    """Return one human line per conclusion, with its evidence, then the contradictions."""
    lines = [_line("family", inference.family)]
    if not inference.quantized:
        what = "AWQ weight-only layers" if inference.family is not None else "not an SVDQuant file"
        lines.append(f"quantized: no SVDQuant W4A4 layer (no int8 qweight; {what})")
    t5 = inference.family is not None and inference.family.value is Family.T5
    lines += [
        _line("precision", inference.precision),
        "rank: none (AWQ W4A16 layers have no low-rank branch)"
        if t5 and inference.rank is None
        else _line("rank", inference.rank),
        _line("group size", inference.group_size),
    ]
    optional = (
        ("num_layers", inference.num_layers),
        ("num_single_layers", inference.num_single_layers),
        ("in_channels", inference.in_channels),
        ("guidance_embeds", inference.guidance_embeds),
        ("hidden_size", inference.hidden_size),
        ("skip_refiners", inference.skip_refiners),
        ("unet_layout", inference.unet_layout),
    )
    lines += [_line(label, fact) for label, fact in optional if fact is not None]
    if inference.family is not None:
        missing = inference.missing_unquantized
        if not missing:
            state = (
                "present" if inference.has_unquantized else "absent (a blocks-only file: the variant cannot be told)"
            )
        else:
            why = "no loader can use it alone" + (
                "" if inference.has_unquantized else ", and the variant cannot be told"
            )
            kind = "an incomplete file" if inference.has_unquantized else "a blocks-only file"
            state = f"missing {', '.join(missing)} ({kind}: {why})"
        lines.append(f"unquantized layers: {state}")
    lines += [f"contradiction: {text}" for text in inference.contradictions]
    return lines
