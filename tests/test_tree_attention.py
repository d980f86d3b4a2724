"""tree_attention against a dense-mask float64 reference, with a tolerance from the dtype."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import ddtree
import reference as ref
from ddtree.threads import cpu_threads  # the CPU kernel's path depends on the thread count
from conftest import devices
from inputs import context_lens, make_logits, random_cost, seed_of

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed, as a fraction of max|v| (outputs are convex combinations of v).

    Half types: the output is rounded to the dtype (eps/2 of |out|), a kernel may round the softmax
    weights to it before P @ V (eps/2 of max|v|) and hold partial outputs over parts of the keys in it
    before combining them (a convex combination: another eps/2 of max|v|): within eps (max|v| + |out|).
    fp32: accumulation over the head dim and the keys, 2^-16 (about 128 eps) with random unit-scale
    inputs.
    """
    return 2.0**-16 if dtype == torch.float32 else torch.finfo(dtype).eps


def skip_outside_cuda_contract(device: str, dtype: torch.dtype, d: int) -> None:
    """The CUDA kernel's contract is fp16/bf16 and head dims 64 and 128 (docs/DESIGN.md); fp32 and other
    head dims are CPU-only."""
    if device == "cuda" and (dtype == torch.float32 or d not in (64, 128)):
        pytest.skip("outside the CUDA kernel's contract (fp16/bf16, head dim 64 or 128)")


def make_tree(B, T, gen, ctx, shrink=False):
    """A tree with ``T`` slots from build_tree over random marginals; ``shrink`` uses a random cost table
    so that some trees stop early and leave rows past num_nodes."""
    D, K = 4, 5
    logprobs, ids = ref.topk_marginals(make_logits(B, D, 50, torch.float32, "normal", gen), K)
    roots = torch.randint(0, 50, (B,), generator=gen)
    cost = random_cost(B, T, gen) if shrink else None
    return ddtree.build_tree(logprobs, ids, roots, ctx, T - 1, cost, 0.01)


def make_qkv(B, Hq, Hkv, T, d, S, dtype, gen):
    q = torch.randn(B, Hq, T, d, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S, d, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S, d, generator=gen).to(dtype)
    return q, k, v


def run_and_compare(q, k, v, ctx, tree_mask, num_nodes, scale, device):
    """Runs the op and checks rows 0..num_nodes against the reference, later rows for finiteness."""
    args = [t.to(device) for t in (q, k, v, ctx, tree_mask, num_nodes)]
    out = ddtree.tree_attention(*args, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    out = out.cpu().double()
    expected = ref.tree_attention(q, k, v, ctx, tree_mask, num_nodes, scale)
    tol = tolerance(q.dtype)
    for b in range(q.shape[0]):
        n = int(num_nodes[b])
        vmax = float(v[b, :, : int(ctx[b]) + n + 1].double().abs().max())  # over the keys a row may see
        got, exp = out[b, :, : n + 1], expected[b, :, : n + 1]
        err = (got - exp).abs()
        bound = tol * (vmax + exp.abs())
        assert (err <= bound).all(), f"request {b}: max error {float(err.max())}, bound {float(bound.min())}"
        assert torch.isfinite(out[b, :, n + 1:]).all(), "rows past num_nodes must be finite"
    return out, expected


SHAPES = list(itertools.product(DTYPES, ((1, 1), (4, 1), (4, 4), (8, 2)), (64, 128, 7), (1, 2, 17, 33)))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype,heads,d,T", SHAPES, ids=str)
def test_matches_reference(dtype, heads, d, T, device):
    skip_outside_cuda_contract(device, dtype, d)
    Hq, Hkv = heads
    gen = torch.Generator().manual_seed(seed_of(dtype, heads, d, T))
    B = 3
    ctx = context_lens(B, 40, gen)  # ragged, the first one 0
    tree = make_tree(B, T, gen, ctx, shrink=(T % 2 == 1))
    S = int(ctx.max()) + T + 5
    q, k, v = make_qkv(B, Hq, Hkv, T, d, S, dtype, gen)
    run_and_compare(q, k, v, ctx, tree.tree_mask, tree.num_nodes, 1 / math.sqrt(d), device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_tree(dtype, device):
    """301 slots: a ten-word mask, and a long context."""
    skip_outside_cuda_contract(device, dtype, 64)
    gen = torch.Generator().manual_seed(11)
    B, T, d = 2, 301, 64
    ctx = torch.tensor([0, 700])
    tree = make_tree(B, T, gen, ctx)
    q, k, v = make_qkv(B, 4, 2, T, d, 700 + T, dtype, gen)
    run_and_compare(q, k, v, ctx, tree.tree_mask, tree.num_nodes, 1 / math.sqrt(d), device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_arbitrary_mask_bits(dtype, device):
    """Masks that are not ancestor closures, with bits set past num_nodes (which must be ignored), rows
    that see nothing (context 0 and an empty row: zeros), and a scale other than 1/sqrt(d)."""
    skip_outside_cuda_contract(device, dtype, 64)
    gen = torch.Generator().manual_seed(5)
    B, T, d, W = 4, 40, 64, 2
    ctx = torch.tensor([0, 3, 0, 9])
    num_nodes = torch.tensor([39, 20, 7, 0], dtype=torch.int32)
    mask = torch.randint(-(2**31), 2**31, (B, T, W), generator=gen, dtype=torch.int64).to(torch.int32)
    mask[0, 5] = 0  # context 0 and no bit: sees nothing
    mask[2, 3] = 0
    q, k, v = make_qkv(B, 2, 1, T, d, 9 + T, dtype, gen)
    out, expected = run_and_compare(q, k, v, ctx, mask, num_nodes, 0.3, device)
    assert (out[0, :, 5] == 0).all() and (out[2, :, 3] == 0).all()
    assert (expected[0, :, 5] == 0).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_tree_and_context(dtype, device):
    """max_nodes = 0 (one slot, the root) and context 0: the root sees only itself, so out = v[root]."""
    skip_outside_cuda_contract(device, dtype, 64)
    gen = torch.Generator().manual_seed(6)
    ctx = torch.zeros(2, dtype=torch.long)
    tree = make_tree(2, 1, gen, ctx)
    q, k, v = make_qkv(2, 4, 4, 1, 64, 3, dtype, gen)
    out, _ = run_and_compare(q, k, v, ctx, tree.tree_mask, tree.num_nodes, 0.125, device)
    torch.testing.assert_close(out.to(dtype), v[:, :, :1], rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_invisible_positions_do_not_leak(dtype, device):
    """Cache positions past ctx + num_nodes, which no row may see, hold huge values and NaN: the output
    must not change (an uninitialised torch.empty cache holds such values)."""
    skip_outside_cuda_contract(device, dtype, 64)
    gen = torch.Generator().manual_seed(8)
    B, T, d = 2, 17, 64
    ctx = torch.tensor([5, 0])
    tree = make_tree(B, T, gen, ctx, shrink=True)
    S = 5 + T + 40
    q, k, v = make_qkv(B, 4, 2, T, d, S, dtype, gen)
    clean = ddtree.tree_attention(q.to(device), k.to(device), v.to(device), ctx.to(device),
                                  tree.tree_mask.to(device), tree.num_nodes.to(device), 0.125).cpu()
    for b in range(B):
        end = int(ctx[b]) + int(tree.num_nodes[b]) + 1
        k[b, :, end:] = float("nan")
        v[b, :, end:] = float("nan")
        k[b, :, end:end + 3] = 1e4
    out, _ = run_and_compare(q, k, v, ctx, tree.tree_mask, tree.num_nodes, 0.125, device)
    for b in range(B):
        n = int(tree.num_nodes[b])
        assert torch.equal(out[b, :, : n + 1], clean[b, :, : n + 1].double())


# Shapes of real size, where the CPU kernel chooses between its blocked path and torch's flash attention
# by dtype, rows per kv head and thread count: ragged contexts including 0, GQA groups 1, 2 and 4, trees
# that stop early, head dims 64 and 128.
LARGE = [(dtype, heads, T, d) for dtype in DTYPES for heads, T, d in (((8, 2), 17, 64), ((16, 8), 64, 128),
                                                                       ((4, 4), 33, 128), ((4, 1), 200, 64))]


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("dtype,heads,T,d", LARGE, ids=str)
def test_large_context_cpu(dtype, heads, T, d, threads):
    """The kernel's paths for real sizes: on one thread fp32/fp16 with 128 rows per kv head the blocked
    path over many key blocks, the rest flash attention in two calls; on two threads flash attention
    in one call."""
    Hq, Hkv = heads
    gen = torch.Generator().manual_seed(seed_of(dtype, heads, T, d))
    B = 3
    ctx = torch.tensor([0, 1500, 777])
    tree = make_tree(B, T, gen, ctx, shrink=True)
    q, k, v = make_qkv(B, Hq, Hkv, T, d, 1500 + T + 3, dtype, gen)
    with cpu_threads(threads):
        run_and_compare(q, k, v, ctx, tree.tree_mask, tree.num_nodes, 1 / math.sqrt(d), "cpu")


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_context_arbitrary_mask_bits(dtype, threads):
    """The flash path with rows that see no tree slot (only the context, or nothing when the context
    is empty), bits past num_nodes, and a large scale (peaked softmax)."""
    gen = torch.Generator().manual_seed(21)
    B, T, d, Hq, Hkv = 3, 40, 64, 8, 2
    ctx = torch.tensor([0, 2000, 1000])
    num_nodes = torch.tensor([39, 20, 30], dtype=torch.int32)
    mask = torch.randint(-(2**31), 2**31, (B, T, 2), generator=gen, dtype=torch.int64).to(torch.int32)
    mask[0, 5] = 0
    mask[1, 7] = 0
    mask[2, :10] = 0
    q, k, v = make_qkv(B, Hq, Hkv, T, d, 2000 + T, dtype, gen)
    with cpu_threads(threads):
        out, _ = run_and_compare(q, k, v, ctx, mask, num_nodes, 0.6, "cpu")
    assert (out[0, :, 5] == 0).all()


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_context_invisible_positions_do_not_leak(dtype, threads):
    gen = torch.Generator().manual_seed(22)
    B, T, d = 2, 64, 128
    ctx = torch.tensor([1200, 0])
    tree = make_tree(B, T, gen, ctx, shrink=True)
    q, k, v = make_qkv(B, 16, 8, T, d, 1200 + T + 50, dtype, gen)
    for b in range(B):
        end = int(ctx[b]) + int(tree.num_nodes[b]) + 1
        k[b, :, end:] = float("nan")
        v[b, :, end:] = float("nan")
    with cpu_threads(threads):
        run_and_compare(q, k, v, ctx, tree.tree_mask, tree.num_nodes, 1 / math.sqrt(d), "cpu")


def dense_mask_bits(B: int, T: int, num_nodes: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Packed ``[B, T, ceil(T / 32)]`` masks with each bit set with probability ``density`` (not ancestor
    closures: rows that see most of the tree, which the CPU kernel attends to as a dense masked block),
    bits past num_nodes set too (they must be ignored)."""
    W = (T + 31) // 32
    bits = torch.rand(B, T, W * 32, generator=gen) < density
    weights = 2 ** torch.arange(32, dtype=torch.int64)
    words = (bits.view(B, T, W, 32).long() * weights).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# The CPU kernel's parallel split, against the reference: units of work (request x kv head x part of the
# context, merged by log-sum-exp) at 1, 2 and 4 threads. B = 3 requests of contexts 0, 1 and 1300 (parts
# of a short context are empty); GQA groups 1, 2 and 8, so request x kv head counts of 24, 9 and 3, of
# which 9 and 3 do not divide among 2 or 4 threads and split the context into parts; head dims 64 and
# 128; draft trees (each row sees its ancestors: folded in slot by slot) and dense random masks (most
# slots seen: one masked block). The calls' sizes put them on the small path (serial), the blocked path
# (fp32/fp16 with 128 rows or more per kv head) and flash attention.
SPLIT_HEADS = ((8, 8), (6, 3), (8, 1))


@pytest.mark.parametrize("threads", (1, 2, 4))
@pytest.mark.parametrize("tree_kind", ("draft", "dense"))
@pytest.mark.parametrize("heads", SPLIT_HEADS, ids=str)
@pytest.mark.parametrize("d", (64, 128))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parallel_split_cpu(dtype, d, heads, tree_kind, threads):
    Hq, Hkv = heads
    gen = torch.Generator().manual_seed(seed_of(dtype, d, heads, tree_kind))
    B = 3
    ctx = torch.tensor([0, 1, 1300])
    if tree_kind == "draft":
        T = 17
        tree = make_tree(B, T, gen, ctx, shrink=True)
        mask, num_nodes = tree.tree_mask, tree.num_nodes
    else:
        T = 80
        num_nodes = torch.tensor([79, 50, 79], dtype=torch.int32)
        mask = dense_mask_bits(B, T, num_nodes, 0.9, gen)
        mask[0, 3] = 0  # context 0 and no bit: this row sees nothing
    q, k, v = make_qkv(B, Hq, Hkv, T, d, 1300 + T + 7, dtype, gen)
    with cpu_threads(threads):
        out, _ = run_and_compare(q, k, v, ctx, mask, num_nodes, 1 / math.sqrt(d), "cpu")
    if tree_kind == "dense":
        assert (out[0, :, 3] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_results_across_thread_counts_cpu(dtype):
    """The same call at 1, 2 and 3 threads (different splits of the context): each within the contract's
    tolerance of the reference, so within twice that of each other."""
    gen = torch.Generator().manual_seed(31)
    B, T, d, Hq, Hkv = 1, 33, 128, 4, 1
    ctx = torch.tensor([3000])
    tree = make_tree(B, T, gen, ctx)
    q, k, v = make_qkv(B, Hq, Hkv, T, d, 3000 + T, dtype, gen)
    outs = []
    for threads in (1, 2, 3):
        with cpu_threads(threads):
            outs.append(run_and_compare(q, k, v, ctx, tree.tree_mask, tree.num_nodes, 0.09, "cpu")[0])
    vmax = float(v.double().abs().max())
    for other in outs[1:]:
        assert ((other - outs[0]).abs() <= 2 * tolerance(dtype) * (vmax + outs[0].abs())).all()
