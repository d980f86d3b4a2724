"""Tree attention on CUDA against SDPA, with the hardware floor beside every time.

Shapes: B = 1, Hq = 32, Hkv = 8, d = 128, bf16, contexts {1024, 4096, 16384}, tree sizes
T in {16, 64, 256, 1024} (a random tree over all T slots). Compared, side by side in the same run:
  * ours:         torch.ops.ddtree.tree_attention (bit-packed mask, GQA in the kernel)
  * sdpa_dense:   F.scaled_dot_product_attention with the equivalent dense additive mask [1, 1, T, S]
                  (what the reference path does); K/V expanded to Hq heads beforehand, outside the timing
  * sdpa_nomask:  the same SDPA call with no mask at all (attends to every key: a lower bound on what a
                  masked SDPA can reach)
Floor = max(K/V/Q/O bytes / measured copy bandwidth, attention FLOPs / measured bf16 matmul rate),
both measured in this script. Times are CUDA-event medians over repetitions of back-to-back calls
after a warm-up; the K/V cache is not flushed from L2 between calls (as for the anchors).
Targets: sdpa_dense / ours >= 3 for T <= 256, and sdpa_nomask / ours >= 1 everywhere.

    PYTHONPATH=python python bench/bench_attention.py --out bench_attention.json
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

import ddtree
from ddtree.timing import events_ms, measure_rates
from ddtree.ops import pack_mask

ANCHORS = Path(__file__).resolve().parent / "data" / "anchors_h100_reference_path.json"


def random_tree_mask(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ancestor mask [1, T, ceil(T/32)] i32 and dense bool [1, T, T] of a random T-slot tree."""
    rng = random.Random(seed)
    dense = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        if i > 0:
            dense[i] = dense[rng.randint(max(0, i - 8), i - 1)]
        dense[i, i] = True
    return pack_mask(dense)[None].cuda(), dense[None].cuda()


def load_anchors() -> dict:
    if not ANCHORS.exists():
        return {}
    rows = json.loads(ANCHORS.read_text()).get("attention", [])
    return {(int(r[0]), int(r[1])): r for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--trees", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--out", type=Path, default=Path("bench_attention.json"))
    args = ap.parse_args()
    assert torch.cuda.is_available() and ddtree.info()["cuda_kernels"], "needs a GPU and the CUDA kernels"

    Hq, Hkv, d, dtype = 32, 8, 128, torch.bfloat16
    G, scale = Hq // Hkv, 1.0 / math.sqrt(d)
    device_name = torch.cuda.get_device_name()
    rates = measure_rates("cuda", dtype)
    bw, rate = rates["bandwidth_gbs"] * 1e9, rates["matmul_tflops"] * 1e12  # bytes/s, FLOP/s
    print(f"device: {device_name}; copy bandwidth {bw / 1e12:.2f} TB/s; bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    anchors = load_anchors()

    header = (f"{'ctx':>6} {'T':>5} | {'ours ms':>8} {'floor ms':>8} {'dense ms':>8} {'nomask ms':>9} | "
              f"{'dense/ours':>10} {'nomask/ours':>11} | {'anchor dense':>12} {'anchor nomask':>13} | {'err':>8} target")
    print(header)
    print("-" * len(header))
    rows = []
    for ctx in args.contexts:
        for T in args.trees:
            S = ctx + T
            g = torch.Generator(device="cuda").manual_seed(ctx + T)
            q = torch.randn(1, Hq, T, d, dtype=dtype, device="cuda", generator=g)
            k = torch.randn(1, Hkv, S, d, dtype=dtype, device="cuda", generator=g)
            v = torch.randn(1, Hkv, S, d, dtype=dtype, device="cuda", generator=g)
            ctx_t = torch.tensor([ctx], dtype=torch.int64, device="cuda")
            nn_t = torch.tensor([T - 1], dtype=torch.int32, device="cuda")
            packed, dense = random_tree_mask(T, seed=T)
            visible = torch.ones(1, T, S, dtype=torch.bool, device="cuda")
            visible[:, :, ctx:] = dense
            add = torch.zeros(1, 1, T, S, dtype=dtype, device="cuda").masked_fill(~visible[:, None], float("-inf"))
            kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)

            def ours():
                return torch.ops.ddtree.tree_attention(q, k, v, ctx_t, packed, nn_t, scale)

            def sdpa_dense():
                return F.scaled_dot_product_attention(q, kr, vr, attn_mask=add, scale=scale)

            def sdpa_nomask():
                return F.scaled_dot_product_attention(q, kr, vr, scale=scale)

            ref = sdpa_dense().float()
            err = ((ours().float() - ref).norm() / ref.norm()).item()  # relative to SDPA (both bf16)
            t_ours, t_dense, t_nomask = (events_ms(f, warmup=10, repeats=25, inner=10)
                                         for f in (ours, sdpa_dense, sdpa_nomask))
            bytes_moved = (2 * Hkv * S * d + 2 * Hq * T * d) * 2
            flops = 4 * Hq * T * S * d
            floor = max(bytes_moved / bw, flops / rate) * 1e3
            ok = (t_dense / t_ours >= 3 or T > 256) and t_nomask / t_ours >= 1
            anchor = anchors.get((ctx, T))
            a_dense = f"{anchor[2]:.4f}" if anchor else "-"
            a_nomask = f"{anchor[3]:.4f}" if anchor else "-"
            print(f"{ctx:>6} {T:>5} | {t_ours:>8.4f} {floor:>8.4f} {t_dense:>8.4f} {t_nomask:>9.4f} | "
                  f"{t_dense / t_ours:>10.2f} {t_nomask / t_ours:>11.2f} | {a_dense:>12} {a_nomask:>13} | "
                  f"{err:>8.1e} {'met' if ok else 'MISSED'}", flush=True)
            rows.append(dict(context=ctx, T=T, ours_ms=t_ours, sdpa_dense_ms=t_dense, sdpa_nomask_ms=t_nomask,
                             floor_ms=floor, dense_over_ours=t_dense / t_ours, nomask_over_ours=t_nomask / t_ours,
                             rel_err_vs_sdpa=err, target_met=ok,
                             anchor_sdpa_dense_ms=anchor[2] if anchor else None,
                             anchor_sdpa_nomask_ms=anchor[3] if anchor else None))
            del q, k, v, kr, vr, add, visible, ref
            torch.cuda.empty_cache()

    result = dict(device=device_name, torch=torch.__version__, ddtree=ddtree.info(), B=1, Hq=Hq, Hkv=Hkv, d=d,
                  dtype="bfloat16", copy_bandwidth_Bps=bw, matmul_flops=rate,
                  timing="CUDA events, median of 25 x (10 back-to-back calls), 10 warm-up calls, L2 not flushed",
                  sdpa_note="K/V expanded to Hq heads before timing (not counted against SDPA)", rows=rows)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
