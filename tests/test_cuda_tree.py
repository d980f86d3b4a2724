"""CUDA topk_marginals and build_tree against the CPU ops, and both under CUDA-graph capture.

The CPU ops are the oracle: token ids, tree nodes, order, parents, depths, positions, masks and scores
must be identical (scores bit for bit); log-probs agree within fp32 rounding (the CPU sums exp in
double, the GPU in fp32 per thread). Run on a GPU with
``PYTHONPATH=python python -m pytest tests/test_cuda_tree.py -q`` (and once under
``compute-sanitizer --tool memcheck``); everything here is skipped without CUDA.
"""
from __future__ import annotations

import itertools
from dataclasses import fields

import pytest
import torch

import ddtree
from inputs import LOGIT_KINDS, context_lens, convex_cost, make_logits, random_cost, seed_of

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not ddtree.info()["cuda_kernels"],
        reason="needs a CUDA device and the CUDA kernels",
    ),
]

EPS32 = torch.finfo(torch.float32).eps
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# topk_marginals


def logprob_tolerance(logits: torch.Tensor, temperature: float, expected: torch.Tensor) -> torch.Tensor:
    """``[B, D, k]`` bound on |cuda - cpu|: a few fp32 roundings of the magnitudes involved
    (largest finite |v|, the result, log V), plus fp32 summation of 16 terms per thread."""
    v = logits.float() / temperature
    finite = torch.where(torch.isfinite(v), v.abs(), torch.zeros_like(v))
    vmax = finite.amax(dim=-1, keepdim=True)
    log_v = torch.log(torch.tensor(float(logits.shape[-1])))
    return 64 * EPS32 * (vmax + expected.abs().nan_to_num(posinf=0.0) + log_v + 1)


def assert_topk_same(logits: torch.Tensor, k: int, temperature: float = 1.0) -> None:
    """logits: ``[B, D, V]`` on the CPU. Runs both ops and compares."""
    exp_lp, exp_ids = torch.ops.ddtree.topk_marginals(logits, k, temperature)
    got_lp, got_ids = torch.ops.ddtree.topk_marginals(logits.cuda(), k, temperature)
    assert got_lp.is_cuda and got_ids.is_cuda
    assert got_lp.dtype == torch.float32 and got_ids.dtype == torch.int64
    assert got_lp.shape == got_ids.shape == exp_lp.shape
    got_lp, got_ids = got_lp.cpu(), got_ids.cpu()
    if not torch.equal(got_ids, exp_ids):
        where = (got_ids != exp_ids).nonzero()[:5].tolist()
        raise AssertionError(f"token ids differ at {where}")
    assert not got_lp.isnan().any()
    assert torch.equal(torch.isneginf(got_lp), torch.isneginf(exp_lp)), "-inf pattern differs"
    fin = torch.isfinite(exp_lp)
    assert torch.isfinite(got_lp[fin]).all()
    err = (got_lp - exp_lp).abs()[fin]
    tol = logprob_tolerance(logits, temperature, exp_lp).expand_as(exp_lp)[fin]
    assert (err <= tol).all(), f"log-prob error {float(err.max())} over tolerance {float(tol.min())}"


TOPK_CASES = [
    (B, D, K, dtype)
    for B, D, K, dtype in itertools.product((1, 3, 8), (1, 4, 15), (1, 4, 64, 1024), DTYPES)
    if not (K == 1024 and B * D > 12)  # keeps the CPU oracle quick; large k has its own tests
]


@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("B,D,K,dtype", TOPK_CASES)
def test_topk_matches_cpu(B, D, K, dtype, kind):
    gen = torch.Generator().manual_seed(seed_of("topk", B, D, K, dtype, kind))
    V = max(K, 3000) + int(torch.randint(0, 50, (1,), generator=gen))  # odd sizes: unaligned rows
    assert_topk_same(make_logits(B, D, V, dtype, kind, gen), K)


@pytest.mark.parametrize("temperature", (0.3, 0.7, 1.0, 1.7))
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_temperature(temperature, dtype):
    # fp32 division x / t decides ties between neighbouring low-precision values: ties kind.
    gen = torch.Generator().manual_seed(seed_of("temp", temperature, dtype))
    for kind in LOGIT_KINDS:
        assert_topk_same(make_logits(2, 5, 4099, dtype, kind, gen), 64, temperature)


@pytest.mark.parametrize("V", (151936, 262144))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_topk_large_vocab(V, dtype):
    # Several chunks per row, k = 1024: the merge sees G * k candidates.
    gen = torch.Generator().manual_seed(seed_of("large", V, dtype))
    for kind in ("normal", "ties"):
        assert_topk_same(make_logits(1, 3, V, dtype, kind, gen), 1024)
    assert_topk_same(make_logits(1, 2, V, dtype, "normal", gen), 16, 0.8)


@pytest.mark.parametrize("V", (1, 7, 16384, 16385, 32768 + 3))
def test_topk_k_equals_vocab_and_chunk_edges(V):
    gen = torch.Generator().manual_seed(seed_of("edges", V))
    for kind in LOGIT_KINDS:
        logits = make_logits(2, 3, V, torch.float32, kind, gen)
        assert_topk_same(logits, min(V, 1024))
        assert_topk_same(logits, 1)


def test_topk_special_values():
    # -0.0 and +0.0 tie (decided by id), a lone +inf, a row of +inf, rows of -inf and NaN.
    V = 5000
    x = torch.full((1, 6, V), -5.0)
    x[0, 0, 10] = -0.0
    x[0, 0, 3] = 0.0
    x[0, 0, 4000] = -0.0
    x[0, 1, 77] = float("inf")
    x[0, 2] = float("inf")
    x[0, 3] = float("-inf")
    x[0, 4] = float("nan")
    x[0, 5, ::3] = float("nan")
    x[0, 5, 1::3] = float("-inf")
    for dtype in DTYPES:
        assert_topk_same(x.to(dtype), 8)
    lp, ids = torch.ops.ddtree.topk_marginals(x.cuda(), 4, 1.0)
    assert ids[0, 0, :3].tolist() == [3, 10, 4000]
    assert lp[0, 1, 0].item() == 0.0 and ids[0, 1, 0].item() == 77


def test_topk_noncontiguous_input():
    gen = torch.Generator().manual_seed(5)
    x = make_logits(3, 4, 3001, torch.bfloat16, "normal", gen).transpose(0, 1)  # [4, 3, V] view
    assert_topk_same(x, 32)


def test_topk_limits_raise():
    # The CUDA kernel's documented limits raise clearly instead of computing garbage.
    x = torch.randn(1, 1, 5000, device="cuda")
    with pytest.raises(RuntimeError, match="k <= 1024"):
        torch.ops.ddtree.topk_marginals(x, 1025, 1.0)
    with pytest.raises(RuntimeError, match="ceil"):
        torch.ops.ddtree.topk_marginals(torch.randn(1, 1, 300000, device="cuda"), 1024, 1.0)


def test_topk_opcheck():
    x = torch.randn(2, 3, 1000, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.ddtree.topk_marginals.default, (x, 16, 0.9))


# --------------------------------------------------------------------------------------------------
# build_tree


def tree_inputs(B, D, K, max_nodes, mode, source, gen, dtype=torch.float32, kind="normal"):
    """CPU inputs of build_tree. source: "topk" (sorted log-probs from topk_marginals, the real use),
    "arbitrary" (unsorted, positive values, NaN: the heap order differs from the score order),
    "ties" (a few log-prob values incl. 0 and -inf: the rank-sequence tie rule decides)."""
    if source == "topk":
        V = K + int(torch.randint(0, 40, (1,), generator=gen))
        logprobs, token_ids = torch.ops.ddtree.topk_marginals(make_logits(B, D, V, dtype, kind, gen), K, 1.0)
    else:
        if source == "arbitrary":
            logprobs = torch.randn(B, D, K, generator=gen)
            logprobs[torch.rand(B, D, K, generator=gen) < 0.05] = float("nan")
            logprobs[torch.rand(B, D, K, generator=gen) < 0.05] = float("-inf")
        else:
            vals = torch.tensor([0.0, -0.0, -1.0, -2.0, float("-inf")])
            logprobs = vals[torch.randint(0, len(vals), (B, D, K), generator=gen)]
            logprobs = logprobs.sort(dim=-1, descending=True).values
        token_ids = torch.randint(0, 100000, (B, D, K), generator=gen)
    roots = torch.randint(0, 100000, (B,), generator=gen)
    ctx = context_lens(B, 4000, gen)
    draft_cost = float(torch.rand(1, generator=gen)) * 0.05
    cost = None
    if mode == "convex":
        cost = convex_cost(B, max_nodes + 1, gen)
    elif mode == "random":
        cost = random_cost(B, max_nodes + 1, gen)
    return logprobs, token_ids, roots, ctx, max_nodes, cost, draft_cost


def run_tree(args, device):
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    return ddtree.build_tree(*moved).to("cpu")


def assert_tree_same(got: ddtree.DraftTree, expected: ddtree.DraftTree, what: str = "") -> None:
    for f in fields(got):
        g, e = getattr(got, f.name), getattr(expected, f.name)
        assert g.dtype == e.dtype and g.shape == e.shape, f"{what}{f.name}: {g.dtype}{tuple(g.shape)} vs {e.dtype}{tuple(e.shape)}"
        if f.name == "scores":  # bit for bit (and -inf == -inf)
            g, e = g.view(torch.int32), e.view(torch.int32)
        if f.name == "expected_tokens":
            # float(1 + phi); phi sums exp(double) whose last ulp may differ between CUDA and glibc.
            ok = torch.allclose(g, e, rtol=4 * EPS32, atol=0)
        else:
            ok = torch.equal(g, e)
        if not ok:
            where = (g != e).nonzero()[:5].tolist()
            raise AssertionError(f"{what}{f.name} differs at {where}:\n got {g}\n expected {e}")


TREE_CASES = [
    c
    for c in itertools.product((1, 3, 8), (1, 4, 15), (1, 4, 64, 1024), (0, 1, 16, 300, 1024))
    if not (c[2] == 1024 and c[0] * c[1] > 24)
]


@pytest.mark.parametrize("mode", ("fixed", "convex", "random"))
@pytest.mark.parametrize("B,D,K,max_nodes", TREE_CASES)
def test_build_tree_matches_cpu(B, D, K, max_nodes, mode):
    gen = torch.Generator().manual_seed(seed_of("tree", B, D, K, max_nodes, mode))
    for source in ("topk", "arbitrary", "ties"):
        args = tree_inputs(B, D, K, max_nodes, mode, source, gen)
        assert_tree_same(run_tree(args, "cuda"), run_tree(args, "cpu"), f"[{source}] ")


@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_build_tree_logit_kinds(dtype, kind):
    gen = torch.Generator().manual_seed(seed_of("tree-kinds", dtype, kind))
    for mode in ("fixed", "convex"):
        args = tree_inputs(4, 6, 16, 200, mode, "topk", gen, dtype, kind)
        assert_tree_same(run_tree(args, "cuda"), run_tree(args, "cpu"), f"[{mode}] ")


def test_build_tree_global_scratch_path():
    # Large enough that the per-request working set exceeds shared memory: global-memory scratch.
    gen = torch.Generator().manual_seed(11)
    for mode in ("fixed", "convex"):
        args = tree_inputs(2, 32, 4096, 6000, mode, "topk", gen)
        assert_tree_same(run_tree(args, "cuda"), run_tree(args, "cpu"), f"[{mode}] ")


def test_build_tree_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(12)
    lp, ids, roots, ctx, n, cost, dc = tree_inputs(3, 4, 64, 100, "convex", "topk", gen)
    lp_t, ids_t = lp.transpose(0, 1).contiguous().transpose(0, 1), ids.transpose(0, 1).contiguous().transpose(0, 1)
    cost_t = cost.t().contiguous().t()
    args = (lp_t, ids_t, roots, ctx, n, cost_t, dc)
    assert_tree_same(run_tree(args, "cuda"), run_tree((lp, ids, roots, ctx, n, cost, dc), "cpu"))


def test_build_tree_opcheck():
    gen = torch.Generator().manual_seed(13)
    args = tree_inputs(2, 3, 8, 20, "convex", "topk", gen)
    moved = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.ddtree.build_tree.default, moved)


# --------------------------------------------------------------------------------------------------
# CUDA graphs


@pytest.mark.parametrize("mode", ("fixed", "convex"))
def test_graph_capture_and_replay(mode):
    """Both ops captured in one graph (no host sync, no allocation that syncs); replays with new input
    values give the CPU result for those values."""
    B, D, V, K, N = 3, 15, 20000, 64, 300
    gen = torch.Generator().manual_seed(seed_of("graph", mode))

    def new_inputs():
        logits = make_logits(B, D, V, torch.bfloat16, "normal", gen)
        roots = torch.randint(0, V, (B,), generator=gen)
        ctx = context_lens(B, 4000, gen)
        cost = convex_cost(B, N + 1, gen)
        return logits, roots, ctx, cost

    logits, roots, ctx, cost = new_inputs()
    s_logits, s_roots, s_ctx, s_cost = (t.cuda() for t in (logits, roots, ctx, cost))
    vc = s_cost if mode == "convex" else None
    draft_cost = 0.02

    def step():
        lp, ids = torch.ops.ddtree.topk_marginals(s_logits, K, 0.9)
        return lp, ids, ddtree.build_tree(lp, ids, s_roots, s_ctx, N, vc, draft_cost)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside capture (allocator, one-time attributes)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_lp, out_ids, out_tree = step()

    for it in range(3):
        if it > 0:
            logits, roots, ctx, cost = new_inputs()
            for dst, src in zip((s_logits, s_roots, s_ctx, s_cost), (logits, roots, ctx, cost)):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        exp_lp, exp_ids = torch.ops.ddtree.topk_marginals(logits, K, 0.9)
        assert torch.equal(out_ids.cpu(), exp_ids)
        assert torch.allclose(out_lp.cpu(), exp_lp, rtol=0, atol=1e-4)
        # The tree from the graph's own log-probs, rebuilt on the CPU: identical.
        cpu_tree = ddtree.build_tree(out_lp.cpu(), out_ids.cpu(), roots, ctx, N,
                                     cost if mode == "convex" else None, draft_cost)
        assert_tree_same(out_tree.to("cpu"), cpu_tree, f"[replay {it}] ")
