"""CUDA verification kernels (tree_attention, accept_tree, compact_kv) against the CPU ops, an fp32
reference and SDPA with an equivalent dense mask. Skipped without a GPU or without the CUDA kernels.

Run on a GPU machine:  PYTHONPATH=python python -m pytest tests/test_cuda_verify.py -q
Memory checker:        PYTHONPATH=python compute-sanitizer --tool memcheck python -m pytest tests/test_cuda_verify.py -q -k "not sweep"
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import ddtree
from ddtree.ops import pack_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not ddtree.info()["cuda_kernels"],
        reason="needs a CUDA device and the extension built with CUDA kernels",
    ),
]

torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must really be fp32
ops = torch.ops.ddtree
DEV = "cuda"
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


# --------------------------------------------------------------------------------------------------
# helpers


def random_tree(T: int, nn: int, rng: random.Random) -> tuple[list[int], torch.Tensor]:
    """parents (len T, -1 for root/unused) and the dense ancestor mask [T, T] bool (rows > nn empty)."""
    parents = [-1] * T
    dense = torch.zeros(T, T, dtype=torch.bool)
    for i in range(nn + 1):
        if i > 0:
            # mix of bushy and chain-like trees
            parents[i] = rng.randint(max(0, i - 4), i - 1) if rng.random() < 0.5 else rng.randint(0, i - 1)
            dense[i] = dense[parents[i]]
        dense[i, i] = True
    return parents, dense


def visibility(ctx: torch.Tensor, dense: torch.Tensor, nn: torch.Tensor, S: int) -> torch.Tensor:
    """[B, T, S] bool: row t sees position p (the tree_attention contract, ops.h)."""
    B, T, _ = dense.shape
    pos = torch.arange(S, device=dense.device)
    j = pos[None, :] - ctx[:, None]  # [B, S]
    in_tree = (j >= 0) & (j <= nn[:, None].long())
    bit = torch.gather(dense, 2, j.clamp(0, T - 1)[:, None, :].expand(B, T, S))
    return (j < 0)[:, None, :] | (in_tree[:, None, :] & bit)


def reference(q, k, v, vis, scale):
    """fp32 attention with a dense mask; rows that see nothing are zero. NaN in unseen keys is ignored."""
    G = q.shape[1] // k.shape[1]
    kf = torch.nan_to_num(k.float()).repeat_interleave(G, 1)
    vf = torch.nan_to_num(v.float()).repeat_interleave(G, 1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis[:, None], float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return p @ vf


def assert_attn_close(out, ref, dtype, what=""):
    """Normwise relative error below the dtype's epsilon, every element within 2 eps of the largest."""
    out = out.float()
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    eps = EPS[dtype]
    scale = ref.abs().max().item()
    err = (out - ref).norm().item() / max(ref.norm().item(), 1e-30)
    worst = (out - ref).abs().max().item()
    assert err <= eps, f"{what}: normwise relative error {err:.3e} > {eps:.3e}"
    assert worst <= 2 * eps * max(scale, 1e-30), f"{what}: max abs error {worst:.3e} (ref max {scale:.3e})"


def make_problem(B, Hq, Hkv, T, d, ctxs, nns, dtype, seed=0, slack=7):
    """Random q/k/v, ragged contexts, random trees. Cache positions no row may see are NaN."""
    rng = random.Random(seed)
    g = torch.Generator(device=DEV).manual_seed(seed)
    S = max(ctxs) + T + slack
    q = torch.randn(B, Hq, T, d, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, S, d, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, S, d, device=DEV, dtype=dtype, generator=g)
    dense = torch.stack([random_tree(T, nn, rng)[1] for nn in nns]).to(DEV)
    ctx = torch.tensor(ctxs, dtype=torch.int64, device=DEV)
    nn = torch.tensor(nns, dtype=torch.int32, device=DEV)
    for b in range(B):  # never read: past the tree's last node
        k[b, :, ctxs[b] + nns[b] + 1 :] = float("nan")
        v[b, :, ctxs[b] + nns[b] + 1 :] = float("nan")
    return q, k, v, ctx, pack_mask(dense), nn, dense, S


def ragged(B, ctx, T):
    if B == 1:
        return [ctx], [T - 1]
    ctxs = [ctx, max(ctx - 37, 0), ctx // 2, min(ctx, 3)][:B]
    nns = [T - 1, T // 2, max(T - 2, 0), 0][:B]
    return ctxs, nns


def check_attention(B, Hq, Hkv, T, d, ctxs, nns, dtype, cpu=True, sdpa=True, seed=0):
    q, k, v, ctx, mask, nn, dense, S = make_problem(B, Hq, Hkv, T, d, ctxs, nns, dtype, seed)
    scale = 1.0 / math.sqrt(d)
    out = ops.tree_attention(q, k, v, ctx, mask, nn, scale)
    assert out.shape == q.shape and out.dtype == dtype
    vis = visibility(ctx, dense, nn, S)
    ref = reference(q, k, v, vis, scale)
    tag = f"B={B} Hq={Hq} Hkv={Hkv} T={T} d={d} ctx={ctxs} nn={nns} {dtype}"
    assert_attn_close(out, ref, dtype, tag + " vs fp32 reference")
    blind = ~vis.any(-1)  # [B, T] rows that see no key: exactly zero
    if blind.any():
        assert (out.permute(0, 2, 1, 3)[blind] == 0).all(), tag + ": a row that sees no key is not zero"
    if cpu:
        out_cpu = ops.tree_attention(q.cpu(), k.cpu(), v.cpu(), ctx.cpu(), mask.cpu(), nn.cpu(), scale)
        assert_attn_close(out, out_cpu.float().to(DEV), dtype, tag + " vs CPU op")
    if sdpa:
        G = Hq // Hkv
        add = torch.zeros(B, 1, T, S, device=DEV, dtype=dtype).masked_fill(~vis[:, None], float("-inf"))
        kr = torch.nan_to_num(k).repeat_interleave(G, 1)
        vr = torch.nan_to_num(v).repeat_interleave(G, 1)
        ref_sdpa = F.scaled_dot_product_attention(q, kr, vr, attn_mask=add, scale=scale)
        seen = (~blind)[:, None, :, None].expand_as(out)
        assert_attn_close(out[seen].view(-1, d), ref_sdpa[seen].float().view(-1, d), dtype, tag + " vs SDPA")
    return out


# --------------------------------------------------------------------------------------------------
# tree_attention


SWEEP = [
    (B, T, ctx)
    for B in (1, 4)
    for T in (1, 2, 17, 64, 257, 1025)
    for ctx in (0, 1, 100, 4096, 16384)
    if not (B == 4 and T == 1025 and ctx == 16384)
]


@pytest.mark.parametrize("B,T,ctx", SWEEP)
def test_tree_attention_sweep(B, T, ctx):
    ctxs, nns = ragged(B, ctx, T)
    cpu = B * T * (ctx + T) <= 20_000_000  # the CPU op is the slow part; the fp32 reference covers all
    check_attention(B, 8, 2, T, 128, ctxs, nns, torch.bfloat16, cpu=cpu, seed=B * 1000 + T + ctx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("B,T,ctx", [(1, 17, 4096), (4, 64, 100), (2, 257, 1000), (1, 1025, 0)])
def test_tree_attention_dtypes_and_head_dims(dtype, d, B, T, ctx):
    ctxs, nns = ragged(B, ctx, T)
    check_attention(B, 8, 2, T, d, ctxs, nns, dtype, seed=T + ctx + d)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (6, 3), (8, 1), (32, 8), (12, 4)])
def test_tree_attention_gqa(Hq, Hkv):
    ctxs, nns = ragged(4, 700, 33)
    check_attention(4, Hq, Hkv, 33, 128, ctxs, nns, torch.bfloat16, seed=Hq * 10 + Hkv)


def test_tree_attention_trees_from_build_tree():
    """Masks, node counts and positions as the real pipeline makes them (CPU build_tree moved to GPU)."""
    B, D, V, K, max_nodes = 3, 8, 500, 6, 60
    g = torch.Generator().manual_seed(5)
    logprobs, token_ids = ddtree.topk_marginals(torch.randn(B, D, V, generator=g) * 3, K)
    ctx_cpu = torch.tensor([900, 0, 37], dtype=torch.int64)
    tree = ddtree.build_tree(logprobs, token_ids, torch.zeros(B, dtype=torch.int64), ctx_cpu, max_nodes).to(DEV)
    T = tree.num_slots
    Hq, Hkv, d, S = 8, 2, 128, 900 + T + 5
    q = torch.randn(B, Hq, T, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, S, d, device=DEV, dtype=torch.bfloat16)
    ctx = ctx_cpu.to(DEV)
    out = ops.tree_attention(q, k, v, ctx, tree.tree_mask, tree.num_nodes, 0.1)
    vis = visibility(ctx, tree.dense_mask(), tree.num_nodes, S)
    assert_attn_close(out, reference(q, k, v, vis, 0.1), torch.bfloat16, "build_tree masks")
    out_cpu = ops.tree_attention(q.cpu(), k.cpu(), v.cpu(), ctx_cpu, tree.tree_mask.cpu(), tree.num_nodes.cpu(), 0.1)
    assert_attn_close(out, out_cpu.float().to(DEV), torch.bfloat16, "build_tree masks vs CPU op")


def test_tree_attention_strided_cache():
    """A view into a bigger static cache (non-contiguous in S and H) reads the same values."""
    B, Hq, Hkv, T, d = 2, 8, 2, 17, 128
    ctxs, nns = [300, 50], [16, 5]
    q, k, v, ctx, mask, nn, dense, S = make_problem(B, Hq, Hkv, T, d, ctxs, nns, torch.bfloat16, seed=3)
    big_k = torch.zeros(B, Hkv + 1, S + 64, d, device=DEV, dtype=torch.bfloat16)
    big_v = torch.zeros_like(big_k)
    big_k[:, :Hkv, :S] = k
    big_v[:, :Hkv, :S] = v
    out = ops.tree_attention(q, big_k[:, :Hkv, :S], big_v[:, :Hkv, :S], ctx, mask, nn, 0.125)
    assert_attn_close(out, reference(q, k, v, visibility(ctx, dense, nn, S), 0.125), torch.bfloat16, "strided")


def test_tree_attention_misaligned_cache():
    """A contiguous cache whose data starts at an odd element offset (not 16-byte aligned) is still read
    correctly (a fresh aligned copy), not with misaligned 16-byte loads."""
    B, Hq, Hkv, T, d = 2, 4, 2, 5, 64
    q, k, v, ctx, mask, nn, dense, S = make_problem(B, Hq, Hkv, T, d, [40, 7], [4, 2], torch.bfloat16, seed=4)
    flat_k = torch.empty(k.numel() + 1, device=DEV, dtype=k.dtype)
    flat_v = torch.empty_like(flat_k)
    k_odd, v_odd = flat_k[1:].view(k.shape), flat_v[1:].view(v.shape)
    k_odd.copy_(k)
    v_odd.copy_(v)
    assert k_odd.is_contiguous() and k_odd.data_ptr() % 16 != 0
    out = ops.tree_attention(q, k_odd, v_odd, ctx, mask, nn, 0.125)
    assert_attn_close(out, reference(q, k, v, visibility(ctx, dense, nn, S), 0.125), torch.bfloat16, "misaligned")


def test_tree_attention_clamps_invalid_values():
    """Out-of-range context lengths and node counts are clamped on CUDA (no sync): finite, in bounds."""
    B, Hq, Hkv, T, d, S = 3, 4, 2, 9, 64, 40
    q = torch.randn(B, Hq, T, d, device=DEV, dtype=torch.float16)
    k = torch.randn(B, Hkv, S, d, device=DEV, dtype=torch.float16)
    v = torch.randn(B, Hkv, S, d, device=DEV, dtype=torch.float16)
    mask = torch.full((B, T, 1), -1, dtype=torch.int32, device=DEV)
    ctx = torch.tensor([-5, 10_000, 31], dtype=torch.int64, device=DEV)
    nn = torch.tensor([-3, 100, 8], dtype=torch.int32, device=DEV)
    out = ops.tree_attention(q, k, v, ctx, mask, nn, 0.125)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    # clamped: ctx -> [0, S - T], num_nodes -> [0, T - 1]
    ctx_c = ctx.clamp(0, S - T)
    nn_c = nn.clamp(0, T - 1)
    dense = torch.ones(B, T, T, dtype=torch.bool, device=DEV)
    ref = reference(q, k, v, visibility(ctx_c, dense, nn_c, S), 0.125)
    assert_attn_close(out, ref, torch.float16, "clamped")


def test_tree_attention_rejects_unsupported():
    q = torch.randn(1, 2, 3, 96, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 8, 96, device=DEV, dtype=torch.bfloat16)
    ctx = torch.zeros(1, dtype=torch.int64, device=DEV)
    mask = torch.ones(1, 3, 1, dtype=torch.int32, device=DEV)
    nn = torch.full((1,), 2, dtype=torch.int32, device=DEV)
    with pytest.raises(RuntimeError, match="head dims 64 and 128"):
        ops.tree_attention(q, k, k, ctx, mask, nn, 0.1)
    q32 = torch.randn(1, 2, 3, 64, device=DEV)
    k32 = torch.randn(1, 2, 8, 64, device=DEV)
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        ops.tree_attention(q32, k32, k32, ctx, mask, nn, 0.1)


# --------------------------------------------------------------------------------------------------
# accept_tree


def accept_reference(tokens, parents, num_nodes, target, max_depth):
    """The sequential walk of ops.h, in Python."""
    B, N1 = tokens.shape
    tokens, parents, target, num_nodes = tokens.tolist(), parents.tolist(), target.tolist(), num_nodes.tolist()
    width = N1 if max_depth < 0 else min(max_depth + 1, N1)
    slots = torch.full((B, width), -1, dtype=torch.int64)
    lens = torch.zeros(B, dtype=torch.int32)
    nxt = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        n, c, path = num_nodes[b], 0, [0]
        while len(path) < width:
            child = next((j for j in range(c + 1, n + 1) if parents[b][j] == c and tokens[b][j] == target[b][c]), None)
            if child is None:
                break
            path.append(child)
            c = child
        slots[b, : len(path)] = torch.tensor(path)
        lens[b] = len(path)
        nxt[b] = target[b][c]
    return slots, lens, nxt


def random_accept_problem(B, N1, vocab, seed):
    rng = random.Random(seed)
    tokens = torch.zeros(B, N1, dtype=torch.int64)
    parents = torch.full((B, N1), -1, dtype=torch.int32)
    num_nodes = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        n = rng.randint(0, N1 - 1)
        num_nodes[b] = n
        for j in range(1, n + 1):
            parents[b, j] = rng.randint(max(0, j - 3), j - 1)
            tokens[b, j] = rng.randrange(vocab)
    target = torch.randint(0, vocab, (B, N1), generator=torch.Generator().manual_seed(seed))
    # make long accepted paths likely: at some slots the target agrees with one of the children
    for b in range(B):
        for j in range(1, int(num_nodes[b]) + 1):
            if rng.random() < 0.6:
                target[b, parents[b, j]] = tokens[b, j]
    return tokens, parents, num_nodes, target


@pytest.mark.parametrize("B,N1,vocab", [(1, 1, 3), (5, 9, 2), (16, 65, 3), (3, 1025, 2), (64, 40, 4)])
@pytest.mark.parametrize("max_depth", [-1, 0, 3, 2000])
def test_accept_tree_matches_cpu(B, N1, vocab, max_depth):
    tokens, parents, num_nodes, target = random_accept_problem(B, N1, vocab, seed=B * N1 + vocab)
    want = accept_reference(tokens, parents, num_nodes, target, max_depth)
    got = ops.accept_tree(tokens.to(DEV), parents.to(DEV), num_nodes.to(DEV), target.to(DEV), max_depth)
    cpu = ops.accept_tree(tokens, parents, num_nodes, target, max_depth)
    for name, w, g, c in zip(("accepted_slots", "accept_len", "next_token"), want, got, cpu):
        assert g.dtype == w.dtype and g.device.type == "cuda", name
        assert torch.equal(g.cpu(), w), f"{name}: CUDA {g.cpu()} != reference {w}"
        assert torch.equal(c, w), f"{name}: CPU op {c} != reference {w}"
    assert got[1].max().item() >= 2 or max_depth == 0 or N1 == 1  # the problem really exercises walks


def test_accept_tree_on_build_tree_output():
    B, D, V, K = 4, 6, 50, 4
    logprobs, token_ids = ddtree.topk_marginals(torch.randn(B, D, V, generator=torch.Generator().manual_seed(1)) * 2, K)
    tree = ddtree.build_tree(logprobs, token_ids, torch.arange(B), torch.full((B,), 10), 30)
    # the target agrees along each tree's first-child chain for a few steps
    target = torch.randint(0, V, tree.tokens.shape, generator=torch.Generator().manual_seed(2))
    for b in range(B):
        c = 0
        for _ in range(b + 1):
            kids = [j for j in range(1, int(tree.num_nodes[b]) + 1) if tree.parents[b, j] == c]
            if not kids:
                break
            target[b, c] = tree.tokens[b, kids[-1]]
            c = kids[-1]
    want = accept_reference(tree.tokens, tree.parents, tree.num_nodes, target, D)
    t = tree.to(DEV)
    got = ops.accept_tree(t.tokens, t.parents, t.num_nodes, target.to(DEV), D)
    for w, g in zip(want, got):
        assert torch.equal(g.cpu(), w)


def test_accept_tree_clamps_num_nodes():
    tokens, parents, num_nodes, target = random_accept_problem(4, 17, 2, seed=9)
    bad = torch.tensor([-4, 1000, 3, 16], dtype=torch.int32)
    got = ops.accept_tree(tokens.to(DEV), parents.to(DEV), bad.to(DEV), target.to(DEV), -1)
    want = accept_reference(tokens, parents, bad.clamp(0, 16), target, -1)
    for w, g in zip(want, got):
        assert torch.equal(g.cpu(), w)


# --------------------------------------------------------------------------------------------------
# compact_kv


def compact_reference(caches, ctx, slots, lens):
    """All reads before any write: gather from a snapshot."""
    out = [c.clone() for c in caches]
    for b in range(slots.shape[0]):
        n, c0 = int(lens[b]), int(ctx[b])
        src = c0 + slots[b, :n].to(caches[0].device)
        for c_new, c_old in zip(out, caches):
            c_new[b, :, c0 : c0 + n] = c_old[b, :, src]
    return out


def run_compact(caches, ctx, slots, lens, cpu=True):
    want = compact_reference(caches, ctx, slots, lens)
    if cpu:
        on_cpu = [c.cpu().clone() for c in caches]
        ops.compact_kv(on_cpu, ctx.cpu(), slots.cpu(), lens.cpu())
    ops.compact_kv(caches, ctx, slots, lens)
    for i, (c, w) in enumerate(zip(caches, want)):
        assert torch.equal(c, w), f"cache {i} ({c.dtype}, {tuple(c.shape)}) differs from the reference"
        if cpu:
            assert torch.equal(on_cpu[i], w.cpu()), f"cache {i}: CPU op differs from the reference"


def test_compact_kv_aliasing():
    """Sources that are also destinations: [0, 1, 2, 4, 5] (dst 3 <- 4 while dst 4 <- 5) and a rotation
    [0, 3, 1, 2] that is only right if every read happens before any write."""
    B, H, S, d = 2, 3, 32, 128
    cache = torch.randn(B, H, S, d, device=DEV, dtype=torch.bfloat16)
    ctx = torch.tensor([4, 20], dtype=torch.int64, device=DEV)
    slots = torch.tensor([[0, 1, 2, 4, 5], [0, 3, 1, 2, -1]], dtype=torch.int64, device=DEV)
    lens = torch.tensor([5, 4], dtype=torch.int32, device=DEV)
    run_compact([cache], ctx, slots, lens)


def test_compact_kv_many_layers_mixed_dtypes():
    B, S = 3, 64
    g = torch.Generator(device=DEV).manual_seed(0)
    caches = []
    for layer in range(6):
        dtype = (torch.bfloat16, torch.float16, torch.float32)[layer % 3]
        H, d = (2, 128) if layer % 2 else (4, 64)
        caches += [torch.randn(B, H, S, d, device=DEV, dtype=dtype, generator=g) for _ in range(2)]
    caches.append(torch.randn(B, 2, S, 3, device=DEV, generator=g))  # 12-byte rows: 4-byte copies
    caches.append(torch.randn(B, 2, S, 5, device=DEV, generator=g).to(torch.float16))  # 10-byte rows
    big = torch.randn(B, 5, S + 9, 80, device=DEV, dtype=torch.bfloat16, generator=g)
    caches.append(big[:, 1:4, 2 : S + 2])  # a strided view into a bigger cache
    big_before = big.clone()
    ctx = torch.tensor([10, 0, 40], dtype=torch.int64, device=DEV)
    slots = torch.tensor([[0, 2, 5, 6, 11], [0, 1, 2, 3, 4], [0, 7, 8, -1, -1]], dtype=torch.int64, device=DEV)
    lens = torch.tensor([5, 5, 3], dtype=torch.int32, device=DEV)
    run_compact(caches, ctx, slots, lens)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[:, 1:4, 2 : S + 2] = False
    assert torch.equal(big[outside], big_before[outside])  # the rest of the bigger cache is untouched


def test_compact_kv_more_caches_than_one_launch_holds_and_long_paths():
    B, S, width = 2, 600, 300
    caches = [torch.randn(B, 1, S, 16, device=DEV, dtype=torch.float16) for _ in range(300)]
    caches.append(torch.randn(B, 2, S, 128, device=DEV))  # 512-byte rows: 64 per staged chunk
    ctx = torch.tensor([5, 100], dtype=torch.int64, device=DEV)
    i = torch.arange(width)
    slots = torch.stack([i + i // 2, i + i // 3]).to(DEV)  # strictly increasing, as accept_tree makes them
    lens = torch.tensor([width, 250], dtype=torch.int32, device=DEV)
    run_compact(caches, ctx, slots, lens, cpu=False)


def test_compact_kv_skips_invalid_entries():
    B, H, S, d = 3, 2, 24, 64
    cache = torch.randn(B, H, S, d, device=DEV, dtype=torch.bfloat16)
    before = cache.clone()
    ctx = torch.tensor([-1, 30, 20], dtype=torch.int64, device=DEV)  # b0, b1 invalid: untouched
    slots = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 9, 3]], dtype=torch.int64, device=DEV)
    lens = torch.tensor([3, 3, 99], dtype=torch.int32, device=DEV)  # accept_len clamped to 3
    ops.compact_kv([cache], ctx, slots, lens)
    torch.cuda.synchronize()
    assert torch.equal(cache[:2], before[:2])
    assert torch.equal(cache[2, :, 21], before[2, :, 21])  # slot 9 -> position 29 >= S: skipped
    assert torch.equal(cache[2, :, 22], before[2, :, 23])  # the valid entry still moves


# --------------------------------------------------------------------------------------------------
# CUDA graphs and opcheck


def test_cuda_graph_capture_of_a_verify_round():
    B, Hq, Hkv, T, d = 4, 32, 8, 17, 128
    ctxs, nns = ragged(B, 3000, T)
    q, k, v, ctx, mask, nn, dense, S = make_problem(B, Hq, Hkv, T, d, ctxs, nns, torch.bfloat16, seed=11)
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)
    q_big = torch.randn(B, Hq, 257, d, device=DEV, dtype=torch.bfloat16)  # the unsplit path too
    dense_big = torch.ones(B, 257, 257, dtype=torch.bool, device=DEV).tril()
    mask_big, nn_big = pack_mask(dense_big), torch.full((B,), 256, dtype=torch.int32, device=DEV)
    k_big = torch.randn(B, Hkv, 3300, d, device=DEV, dtype=torch.bfloat16)
    tokens, parents, num_nodes, target = (t.to(DEV) for t in random_accept_problem(B, T, 2, seed=4))
    caches = [k.clone(), v.clone()]
    saved = [c.clone() for c in caches]

    def round_():
        out = ops.tree_attention(q, k, v, ctx, mask, nn, 0.088)
        out_big = ops.tree_attention(q_big, k_big, k_big, ctx, mask_big, nn_big, 0.088)
        acc, alen, nxt = ops.accept_tree(tokens, parents, num_nodes, target, 8)
        ops.compact_kv(caches, ctx, acc, alen)
        return out, out_big, acc, alen, nxt

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        round_()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = round_()

    # new inputs, written in place; the replay must see them
    q.copy_(torch.randn_like(q))
    ctx.copy_(torch.tensor([2000, 0, 2999, 17], device=DEV))
    target.copy_(tokens.roll(-1, 1))
    for c, s in zip(caches, saved):
        c.copy_(s)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.clone() for t in captured]
    after_graph = [c.clone() for c in caches]
    for c, s in zip(caches, saved):
        c.copy_(s)
    eager = round_()
    for r, e in zip(replayed, eager):
        assert torch.equal(r, e)
    for a, c in zip(after_graph, caches):
        assert torch.equal(a, c)


def test_opcheck_cuda():
    q, k, v, ctx, mask, nn, _, _ = make_problem(2, 4, 2, 5, 64, [7, 0], [4, 2], torch.bfloat16, seed=1)
    torch.library.opcheck(ops.tree_attention.default, (q, torch.nan_to_num(k), torch.nan_to_num(v), ctx, mask, nn, 0.1))
    tokens, parents, num_nodes, target = (t.to(DEV) for t in random_accept_problem(2, 9, 2, seed=2))
    torch.library.opcheck(ops.accept_tree.default, (tokens, parents, num_nodes, target, 4))
    slots = torch.tensor([[0, 2, -1], [0, 1, 3]], device=DEV)
    lens = torch.tensor([2, 3], dtype=torch.int32, device=DEV)
    torch.library.opcheck(ops.compact_kv.default, ([torch.randn(2, 2, 16, 64, device=DEV)], ctx, slots, lens))
