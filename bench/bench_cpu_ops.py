"""The CPU kernels against the torch calls they replace, side by side, with the hardware floor beside them.

tree_attention (B = 1, Hq 16, Hkv 8, d 128; contexts L, trees of n slots from build_tree):
  * ours:  torch.ops.ddtree.tree_attention (packed ancestor bits, GQA in the kernel)
  * torch: F.scaled_dot_product_attention with the equivalent dense additive mask [1, 1, n, L + n], K/V
           expanded to Hq heads by repeat_interleave beforehand (outside the timing)
  floor = max(Q/K/V/O bytes / measured copy bandwidth, attention FLOPs / measured matmul rate), the FLOPs
          of the (row, key) pairs a row sees: the whole context and its ancestors in the tree (SDPA's dense
          mask computes every pair of the tree block too)
topk_marginals (B = 1, D = 15, V = 151936):
  * ours:  torch.ops.ddtree.topk_marginals(logits, k)
  * torch: torch.topk(logits, k) and torch.logsumexp(logits, -1)
  floor = logits bytes / measured copy bandwidth

Both rates come from ddtree.cost.measure_rates in this run, at each thread count. Times are medians of
wall-clock times of single calls, ours and torch's alternating so that a load change on a shared
machine hits both; the load average is printed with the table. ratio = torch / ours (> 1: ours faster);
torch/floor is the most any kernel could gain over torch's call (the ratio of one running at the floor).

    PYTHONPATH=python python bench/bench_cpu_ops.py              # full grid, 1 and 2 threads
    PYTHONPATH=python python bench/bench_cpu_ops.py --quick      # a reduced grid (about a minute)
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

import ddtree  # noqa: F401  (registers torch.ops.ddtree)
from ddtree.cost import synthetic_tree
from ddtree.timing import measure_rates

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def paired_ms(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median wall-clock ms of single calls of each, alternating, after one warm-up call of each."""
    ours(), theirs()
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((ours, a), (theirs, b)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(a), statistics.median(b)


def repeats_for(ms_estimate: float) -> int:
    return max(3, min(15, int(400 / max(ms_estimate, 1e-3))))


def attention_rows(contexts, trees, dtypes, rates, seed: int = 0):
    Hq, Hkv, d = 16, 8, 128
    G, scale = Hq // Hkv, 1.0 / math.sqrt(d)
    for L in contexts:
        for n in trees:
            gen = torch.Generator().manual_seed(seed + L + n)
            tree = synthetic_tree(n - 1, L, generator=gen)  # n slots: the root and n - 1 nodes
            ctx = torch.tensor([L])
            visible = torch.ones(1, n, L + n, dtype=torch.bool)
            visible[:, :, L:] = tree.dense_mask()
            pairs = int(visible.sum())  # (row, key) pairs seen
            for name in dtypes:
                dtype = DTYPES[name]
                q = torch.randn(1, Hq, n, d, generator=gen).to(dtype)
                k = torch.randn(1, Hkv, L + n, d, generator=gen).to(dtype)
                v = torch.randn(1, Hkv, L + n, d, generator=gen).to(dtype)
                add = torch.zeros(1, 1, n, L + n, dtype=dtype).masked_fill(~visible[:, None], float("-inf"))
                kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)

                def ours():
                    return torch.ops.ddtree.tree_attention(q, k, v, ctx, tree.tree_mask,
                                                           tree.num_nodes, scale)

                def theirs():
                    return F.scaled_dot_product_attention(q, kr, vr, attn_mask=add, scale=scale)

                err = (ours().float() - theirs().float()).abs().max().item()
                t0 = time.perf_counter()
                ours()
                ours_ms, torch_ms = paired_ms(ours, theirs, repeats_for((time.perf_counter() - t0) * 1e3 * 2))
                elem = q.element_size()
                nbytes = (2 * Hkv * (L + n) * d + 2 * Hq * n * d) * elem
                flops = 4 * G * Hkv * pairs * d
                bw, mm = rates[name]
                floor = max(nbytes / bw, flops / mm) * 1e3
                yield (f"L={L:<6} n={n:<4} {name}", ours_ms, torch_ms, floor, f"max|ours - sdpa| {err:.1e}")


def topk_rows(ks, dtypes, rates, seed: int = 0):
    D, V = 15, 151_936
    for name in dtypes:
        gen = torch.Generator().manual_seed(seed)
        logits = (3 * torch.randn(1, D, V, generator=gen)).to(DTYPES[name])
        for k in ks:
            def ours():
                return torch.ops.ddtree.topk_marginals(logits, k, 1.0)

            def theirs():
                return torch.topk(logits, k), torch.logsumexp(logits, -1)

            # The contract's order: value descending, ties by smaller id (a stable sort).
            expected = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[..., :k]
            same = torch.equal(ours()[1], expected)
            ours_ms, torch_ms = paired_ms(ours, theirs, 15)
            floor = logits.numel() * logits.element_size() / rates[name][0] * 1e3
            yield (f"D={D} V={V} k={k:<5} {name}", ours_ms, torch_ms, floor, f"ids equal a stable sort's: {same}")


def print_table(title: str, rows) -> None:
    print(f"\n{title}")
    header = (f"{'case':<30} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} {'floor ms':>9} {'ours/floor':>10} "
              f"{'torch/floor':>11}  check")
    print(header)
    print("-" * len(header))
    for case, ours_ms, torch_ms, floor, check in rows:
        print(f"{case:<30} {ours_ms:9.2f} {torch_ms:9.2f} {torch_ms / ours_ms:6.2f} {floor:9.3f} "
              f"{ours_ms / floor:10.1f} {torch_ms / floor:11.1f}  {check}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid: L 1024/4096, n 16/64, k 16/1024")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--skip", choices=["attention", "topk"], help="leave one op out")
    args = ap.parse_args()
    contexts = [1024, 4096] if args.quick else [1024, 4096, 8192, 16384]
    trees = [16, 64] if args.quick else [16, 64, 256]
    ks = [16, 1024] if args.quick else [16, 256, 1024]

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, capability {torch.backends.cpu.get_cpu_capability()}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        rates = {}
        for name in args.dtypes:
            r = measure_rates("cpu", DTYPES[name])
            rates[name] = (r["bandwidth_gbs"] * 1e9, r["matmul_tflops"] * 1e12)
        desc = ", ".join(f"{name} matmul {rates[name][1] / 1e9:.0f} GFLOP/s" for name in args.dtypes)
        print(f"\n== {threads} thread(s): copy bandwidth {rates[args.dtypes[0]][0] / 1e9:.1f} GB/s, {desc}; "
              f"load average {os.getloadavg()[0]:.1f}")
        if args.skip != "attention":
            print_table(f"tree_attention vs SDPA + dense mask ({threads} thread(s))",
                        attention_rows(contexts, trees, args.dtypes, rates))
        if args.skip != "topk":
            print_table(f"topk_marginals vs torch.topk + torch.logsumexp ({threads} thread(s))",
                        topk_rows(ks, args.dtypes, rates))
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
