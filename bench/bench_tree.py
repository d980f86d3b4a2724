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
anchors measured earlier on an H100 (bench/data/anchors_h100_reference_path.json) are printed for
context only: every ratio uses the side-by-side measurement. The reference path is in
bench/reference_pipeline.py.

    PYTHONPATH=python python bench/bench_tree.py --out bench_tree.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import ddtree
from ddtree.timing import events_ms, measure_rates, median_ms, wall_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_pipeline import reference_topk, reference_tree, reference_tree_one  # noqa: E402

ANCHORS = Path(__file__).resolve().parent / "data" / "anchors_h100_reference_path.json"


def load_anchors() -> dict:
    return json.loads(ANCHORS.read_text()) if ANCHORS.exists() else {}


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
        ours = events_ms(lambda: torch.ops.ddtree.topk_marginals(logits, k, 1.0), 10, args.iters)
        ref = events_ms(lambda: reference_topk(logits, k), 10, args.iters)
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

            ours = events_ms(ours_fn, 5, max(10, args.iters // 4))
            ref = median_ms(lambda: reference_tree(logits, n, n, roots_l, ctx_l), "cuda", 1, args.ref_iters, wall_ms)
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
