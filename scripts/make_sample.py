#!/usr/bin/env python3
"""Write a sample old conversion: a real SVDQuant tensor table with no metadata.

By default a sparse file (the data region is a hole: 6.8 GB apparent size, almost no disk);
``--random`` fills it with real random bytes instead (for copy benchmarks).

    python scripts/make_sample.py OUT.safetensors [--preset flux.1-dev] [--precision int4] [--rank 32]

Presets: every known model (flux.1-dev, ..., qwen-image-edit, sdxl, sdxl-turbo, t5-xxl), or any name ``--model``
accepts (svdq-int4_r32-sdxl-turbo, awq-int4-flux.1-t5xxl, a Lightning file name: its base model's table).
The T5 encoder is AWQ int4 only.
"""

from __future__ import annotations

import argparse
import sys

from patcher import synth
from patcher.errors import PatchError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument(
        "--preset", default="flux.1-dev", help=f"model preset (default: flux.1-dev): {', '.join(synth.PRESETS)}"
    )
    parser.add_argument("--precision", default="int4", choices=["int4", "nvfp4"])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink layer widths (0 < scale <= 1)")
    parser.add_argument("--blocks-only", action="store_true", help="omit the unquantized layers")
    parser.add_argument("--random", action="store_true", help="real random bytes instead of a sparse hole")
    args = parser.parse_args(argv)
    try:
        spec = synth.preset(
            args.preset,
            precision=args.precision,
            rank=args.rank,
            scale=args.scale,
            include_unquantized=not args.blocks_only,
        )
        tensors = synth.table_to_tensors(synth.build_table(spec))
    except PatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.random:
        synth.write_random(args.output, tensors)
    else:
        synth.write_sparse(args.output, tensors)
    size = synth.data_size(tensors)
    print(f"wrote {args.output}: {len(tensors):,} tensors, {size / 1e9:.2f} GB of tensor data, no metadata")
    return 0


if __name__ == "__main__":
    sys.exit(main())
