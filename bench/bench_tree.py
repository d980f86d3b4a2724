"""Draft-tree construction on the GPU: ours against the reference path, measured side by side.

* topk_marginals at D=15, V=151936, bf16, k in {16, 64, 256, 1024} (B=1) against torch.topk +
  torch.logsumexp on the same tensor. Target: >= 10x.
* Whole tree construction (topk_marginals + build_tree) at D=15, max_nodes in {16, 64, 256, 1024},
  B in {1, 32}, K = max_nodes candidates per depth, against the reference path run per request:
  torch.topk + torch.logsumexp on the GPU, copy to the host, Python heapq best-first build, numpy
  visibility matrix. Target: >= 100x.

Times are medians over repeated calls after warm-up: CUDA events for the GPU-only paths, wall clock
(ending in the host copy the path needs anyway) for the reference tree path. The floor is the bytes of
logits read once over the bandwidth of a large device-to-device copy measured in this run. The
anchors measured earlier on an H100 (shared/data/anchors_h100_reference_path.json) are printed for
context only: every ratio uses the side-by-side measurement.

    PYTHONPATH=python python bench/bench_tree.py --out bench_tree.json
"""
from __future__ import annotations

import argparse
import heapq
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import ddtree
from ddtree.cost import measure_rates

REPO = Path(__file__).resolve().parent.parent
ANCHOR_PATHS = (REPO / "shared/data/anchors_h100_reference_path.json",
                Path("/work/shared/data/anchors_h100_reference_path.json"))


def cuda_median_ms(fn, iters: int, warmup: int) -> float:
    """Median of per-call CUDA-event times of fn() on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def wall_median_ms(fn, iters: int, warmup: int) -> float:
    """Median wall time of fn() from a synchronised start to its (synchronising) end."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------------
# The reference path, reimplemented from the algorithm.


def reference_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk + torch.logsumexp: [.., V] -> (log-probs [.., k] f32, ids [.., k] i64)."""
    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    vals, ids = torch.topk(logits, k, dim=-1)
    return vals.float() - lse, ids


def reference_tree_one(logits: torch.Tensor, k: int, max_nodes: int, root: int, ctx: int):
    """One request: logits [D, V] on the GPU. Best-first heap in Python, numpy visibility matrix."""
    lp, ids = reference_topk(logits, k)
    lp, ids = lp.cpu().numpy(), ids.cpu().numpy()
    D, K = lp.shape
    tokens, parents, depths, scores = [root], [-1], [0], [0.0]
    heap = [(-float(lp[0, 0]), (0,), 0, 0.0)]  # (-score, rank sequence, parent slot, parent score)
    while heap and len(tokens) <= max_nodes:
        neg, seq, parent, pscore = heapq.heappop(heap)
        slot, d, r = len(tokens), len(seq), seq[-1]
        tokens.append(int(ids[d - 1, r]))
        parents.append(parent)
        depths.append(d)
        scores.append(-neg)
        if r + 1 < K:
            heapq.heappush(heap, (-(pscore + float(lp[d - 1, r + 1])), seq[:-1] + (r + 1,), parent, pscore))
        if d < D:
            heapq.heappush(heap, (neg - float(lp[d, 0]), seq + (0,), slot, -neg))
    n = len(tokens)
    vis = np.zeros((n, n), dtype=bool)
    vis[0, 0] = True
    for i in range(1, n):
        vis[i] = vis[parents[i]]
        vis[i, i] = True
    positions = ctx + np.asarray(depths)
    return tokens, parents, depths, positions, scores, vis


def reference_tree(logits: torch.Tensor, k: int, max_nodes: int, roots: list, ctxs: list):
    return [reference_tree_one(logits[b], k, max_nodes, roots[b], ctxs[b]) for b in range(logits.shape[0])]


# --------------------------------------------------------------------------------------------------


def load_anchors() -> dict:
    for p in ANCHOR_PATHS:
        if p.exists():
            return json.loads(p.read_text())
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--iters", type=int, default=100, help="timed calls per GPU measurement")
    ap.add_argument("--ref-iters", type=int, default=7, help="timed calls per reference-tree measurement")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--depth", type=int, default=15)
    args = ap.parse_args()
    assert torch.cuda.is_available() and ddtree.info()["cuda_kernels"], "needs a GPU and the CUDA kernels"

    torch.manual_seed(0)
    D, V = args.depth, args.vocab
    device = torch.cuda.get_device_name()
    bw = measure_rates("cuda")["bandwidth_gbs"]
    anchors = load_anchors()
    anchor_topk = {int(r[0]): r[1] for r in anchors.get("topk_ms", [])}
    anchor_build = {int(r[0]): r[1] for r in anchors.get("ddtree_build_ms", [])}
    print(f"device: {device}   torch {torch.__version__}   ddtree {ddtree.__version__}")
    print(f"measured device-copy bandwidth: {bw:.0f} GB/s   (D={D}, V={V}, bf16 logits)")
    results = {"device": device, "torch": torch.__version__, "bandwidth_gbs": bw, "D": D, "V": V,
               "topk": [], "tree": []}

    # ---- topk_marginals
    print("\ntopk_marginals, B=1                ours ms  torch ms   ratio  floor ms  ours/floor  anchor ms (earlier H100)")
    logits = torch.randn(1, D, V, device="cuda", dtype=torch.bfloat16) * 3
    floor = logits.numel() * logits.element_size() / (bw * 1e9) * 1e3
    for k in (16, 64, 256, 1024):
        ours = cuda_median_ms(lambda: torch.ops.ddtree.topk_marginals(logits, k, 1.0), args.iters, 10)
        ref = cuda_median_ms(lambda: reference_topk(logits, k), args.iters, 10)
        # Sanity: the same log-prob values (ids may differ on ties, where torch.topk's order is unspecified).
        got = torch.ops.ddtree.topk_marginals(logits, k, 1.0)[0]
        exp = reference_topk(logits, k)[0]
        ok = torch.allclose(got, exp, rtol=0, atol=1e-4)
        a = anchor_topk.get(k)
        print(f"  k={k:<5d}{'' if ok else ' VALUES DIFFER'}{'':22s}{ours:8.4f}  {ref:8.4f}  {ref / ours:6.1f}x"
              f"  {floor:8.4f}  {ours / floor:9.1f}x  {a if a is None else f'{a:.4f}'}")
        results["topk"].append({"B": 1, "k": k, "ours_ms": ours, "reference_ms": ref, "ratio": ref / ours,
                                "floor_ms": floor, "anchor_ms": a, "values_match": ok})

    # ---- whole tree construction
    print("\ntree (topk + build), K = max_nodes  ours ms  ref ms     ratio  floor ms  ours/floor  anchor ms (B=1, earlier H100)")
    for B in (1, 32):
        logits = torch.randn(B, D, V, device="cuda", dtype=torch.bfloat16) * 3
        roots = torch.randint(0, V, (B,), device="cuda")
        ctx = torch.randint(100, 4000, (B,), device="cuda")
        roots_l, ctx_l = roots.tolist(), ctx.tolist()
        floor = logits.numel() * logits.element_size() / (bw * 1e9) * 1e3
        for n in (16, 64, 256, 1024):
            def ours_fn():
                lp, ids = torch.ops.ddtree.topk_marginals(logits, n, 1.0)
                return torch.ops.ddtree.build_tree(lp, ids, roots, ctx, n, None, 0.0)

            ours = cuda_median_ms(ours_fn, max(10, args.iters // 4), 5)
            ref = wall_median_ms(lambda: reference_tree(logits, n, n, roots_l, ctx_l), args.ref_iters, 1)
            # Sanity: the same number of nodes and the same root-children tokens at depth 1 for request 0.
            tree = ours_fn()
            ref0 = reference_tree_one(logits[0], n, n, roots_l[0], ctx_l[0])
            ok = int(tree[0][0]) == len(ref0[0]) - 1
            a = anchor_build.get(n) if B == 1 else None
            print(f"  B={B:<3d}max_nodes={n:<5d}{'' if ok else ' SIZE DIFFERS'}{'':9s}{ours:8.4f}  {ref:8.3f}"
                  f"  {ref / ours:7.1f}x  {floor:8.4f}  {ours / floor:9.1f}x  {a if a is None else f'{a:.4f}'}")
            results["tree"].append({"B": B, "max_nodes": n, "K": n, "ours_ms": ours, "reference_ms": ref,
                                    "ratio": ref / ours, "floor_ms": floor, "anchor_ms": a, "sizes_match": ok})

    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
