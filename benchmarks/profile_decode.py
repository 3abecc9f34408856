"""One INT4-BDR128 paged decode call at a given shape, for ``ncu`` (hardware counters).

    ncu --clock-control none -k regex:paged_decode -c 1 --section SpeedOfLight \
        --section WarpStateStats --section SchedulerStats --section Occupancy \
        python benchmarks/profile_decode.py --batch 64 --context 8192
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_kernels import decode_inputs, fmt_args, page_format


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--method", default="int4-bdr128")
    args = ap.parse_args()
    from sawkv.kernels import paged_attention_decode

    bits, had, rot_v, kh = fmt_args(args.method)
    pages, sets, seq_lens = decode_inputs(args.batch, args.context, bits, 1, seed=0, k_half=kh)
    q, tables = sets[0]
    fmt = page_format(bits, had, rot_v, k_half=kh)
    for _ in range(3):
        paged_attention_decode(q, pages, tables, seq_lens, fmt, scale=0.088)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
