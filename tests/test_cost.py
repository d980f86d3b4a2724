"""The cost model (ddtree.cost, ddtree.cost_fit): fit, JSON, table, default estimate, profile. CPU only.

Data: tests/data/caddtree_cost_curves_a800.json holds the monotone-convex verification-cost curves
published with CaDDTree (MIT license, cost_models/*_convex.pt, measured on A800s with Hugging Face
transformers in bf16), in seconds, for Qwen3-4B/8B at contexts 1..8000 and n = 0..512 nodes.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ddtree
from ddtree.cost import CostModel, DRAFT_FRACTION, OVERHEAD_MS, OVERHEAD_MS_PER_LAYER, default_node_grid, profile
from ddtree.cost_fit import eval_curves, fit_monotone_convex

DATA = Path(__file__).parent / "data" / "caddtree_cost_curves_a800.json"
# float64 rounding of sums of O(100) ms values: far below any real violation of convexity.
TOL64 = 1e-12


def _slope_diffs(n, v):
    """First slopes and slope increments of the piecewise-linear curve through (n, v), last axis."""
    slopes = np.diff(v, axis=-1) / np.diff(np.asarray(n, dtype=np.float64))
    return slopes, np.diff(slopes, axis=-1)


def _assert_monotone_convex(n, v, tol):
    slopes, incs = _slope_diffs(n, v)
    assert slopes.min() >= -tol, f"decreasing: min slope {slopes.min()}"
    assert incs.min() >= -tol, f"not convex: min slope increment {incs.min()}"


@functools.lru_cache(maxsize=None)
def _a800_fit(model: str):
    d = json.loads(DATA.read_text())["models"][model]
    ctx = d["context_lengths"]
    med = np.array([d["verify_cost"][str(c)] for c in ctx]) * 1e3  # s -> ms
    return CostModel.fit(list(range(med.shape[1])), ctx, med, d["draft_cost"] * 1e3), med  # ~5 s: fit once


def _a800(model: str) -> tuple[CostModel, np.ndarray]:
    """A fresh CostModel (ms) of one model's published curves fitted on all 513 node counts, and the
    published values ``[contexts, 513]`` in ms."""
    fitted, med = _a800_fit(model)
    return CostModel(fitted.node_grid, fitted.contexts, fitted.verify_ms, fitted.draft_cost), med


# ---------------------------------------------------------------------------------------------------
# Fitting


def test_fit_recovers_noisy_convex_curve():
    rng = np.random.default_rng(0)
    n = np.array(default_node_grid(512), dtype=np.float64)
    truth = 30.0 + 0.004 * n + 0.05 * np.maximum(n - 128, 0) + 2e-5 * n**2  # ms, convex, increasing
    sigma = 0.3
    y = truth + rng.normal(0.0, sigma, n.shape)
    y[1] = y[0] - 1.0  # a dip at the start, as noisy small-n timings often have
    fit = fit_monotone_convex(n, y)

    _assert_monotone_convex(n, fit, TOL64 * fit.max())
    # Least squares over a set containing the truth: never worse than the truth itself.
    assert np.sum((fit - y) ** 2) <= np.sum((truth - y) ** 2) * (1 + 1e-9)
    assert np.sqrt(np.mean((fit - truth) ** 2)) < sigma
    # Exact data is recovered exactly.
    np.testing.assert_allclose(fit_monotone_convex(n, truth), truth, rtol=1e-9)

    # Past the grid (and below it) the curve stays non-decreasing and convex: integers 0..2048.
    x = np.arange(0, 2049)
    vals = eval_curves(n, fit, x)
    assert np.all(np.diff(vals) >= 0)
    assert np.diff(vals, 2).min() >= -TOL64 * vals.max()
    np.testing.assert_array_equal(eval_curves(n, fit, n), fit)  # exact at the knots


def test_fit_concave_data_gives_best_convex_line():
    # Concave samples: the best monotone convex fit of a concave curve is affine (no slope increase fits).
    n = np.arange(0, 33, dtype=np.float64)
    y = np.sqrt(n)
    fit = fit_monotone_convex(n, y)
    _assert_monotone_convex(n, fit, 1e-12)
    ls_line = np.polyval(np.polyfit(n, y, 1), n)
    np.testing.assert_allclose(fit, ls_line, atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# The published A800 curves through fit, JSON and table


@pytest.mark.parametrize("name", ["Qwen3-4B", "Qwen3-8B"])
def test_a800_curves_survive_fit_save_load(name, tmp_path):
    model, med = _a800(name)
    # The published curves are already monotone convex fits (rounded to 6 digits): the refit stays on them.
    assert np.abs(model.verify_ms - med).max() < 1e-3  # ms
    path = tmp_path / "m.json"
    model.save(path)
    loaded = CostModel.load(path)
    np.testing.assert_array_equal(loaded.verify_ms, model.verify_ms)  # JSON floats round-trip exactly
    assert loaded.contexts == model.contexts and loaded.node_grid == model.node_grid
    assert loaded.draft_cost == pytest.approx(6.5)

    # A sparse profile-like grid reproduces all 513 points closely: worst (1.8%) at the sharp knee near
    # n = 170 that falls between grid points 160 and 192; 0.5% on average.
    grid = default_node_grid(512)
    sparse = CostModel.fit(grid, model.contexts, med[:, grid], model.draft_cost)
    rel = np.abs(eval_curves(grid, sparse.verify_ms, np.arange(513)) / med - 1)
    assert rel.max() < 0.025 and rel.mean() < 0.005

    # The device table: exact within a bucket's centre, monotone in float32, convex up to float32 rounding.
    ctx = torch.tensor([1, 1000, 4000, 4500, 8000, 12000])
    table = loaded.table(ctx, 600)
    assert table.shape == (6, 601) and table.dtype == torch.float32 and table.device == ctx.device
    t = table.double().numpy()
    assert np.all(np.diff(t, axis=1) >= 0)
    assert np.diff(t, 2, axis=1).min() >= -4 * np.finfo(np.float32).eps * t.max()
    between = sorted([loaded.verify_cost(np.arange(601), 4000), loaded.verify_cost(np.arange(601), 5000)], key=sum)
    assert np.all(between[0] <= t[3] + 1e-4) and np.all(t[3] <= between[1] + 1e-4)  # 4500: interpolated in l
    np.testing.assert_allclose(t[2, :513], med[4], rtol=2e-4)  # 4000 is a bucket centre (62 * 64 + 32)
    np.testing.assert_allclose(t[4, :513], loaded.verify_cost(np.arange(513), 8000 // 64 * 64 + 32), rtol=1e-6)
    assert np.all(t[5] > t[4])  # extrapolated past the last profiled context: grows with l


def test_table_is_a_cached_gather():
    model, _ = _a800("Qwen3-8B")
    ctx = torch.tensor([0, 63, 64, 5000, 10**7])
    a = model.table(ctx, 64)
    assert len(model._tables) == 1
    b = model.table(torch.tensor([5000]), 64)
    assert len(model._tables) == 1  # same (device, max_nodes): no rebuild
    torch.testing.assert_close(b[0], a[3], rtol=0, atol=0)
    torch.testing.assert_close(a[0], a[1], rtol=0, atol=0)  # same bucket
    torch.testing.assert_close(a[4], model.table(torch.tensor([model.max_context]), 64)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# The table drives build_tree's stop exactly as theta says


def test_theta_from_table_reproduces_build_tree_stop():
    model, _ = _a800("Qwen3-8B")
    g = torch.Generator().manual_seed(1)
    B, D, K, N = 16, 16, 8, 256
    # Confidence varies per request so that the optimal budget varies.
    temp = torch.linspace(0.3, 3.0, B).view(B, 1, 1)
    logprobs = torch.log_softmax(torch.randn(B, D, K, generator=g) * 4 / temp, -1).sort(-1, descending=True).values
    token_ids = torch.randint(0, 1000, (B, D, K), generator=g)
    roots = torch.zeros(B, dtype=torch.int64)
    ctx = torch.randint(0, 9000, (B,), generator=g)
    table = model.table(ctx, N)

    full = ddtree.build_tree(logprobs, token_ids, roots, ctx, N)  # the same heap order, never stopped
    tree = ddtree.build_tree(logprobs, token_ids, roots, ctx, N, table, model.draft_cost)

    phi = np.concatenate([np.zeros((B, 1)), np.cumsum(np.exp(full.scores[:, 1:].double().numpy()), 1)], 1)
    theta = (1 + phi) / (model.draft_cost + table.double().numpy())  # [B, N+1], theta[b, n]
    stop = np.diff(theta, axis=1) <= 0  # stop[b, n]: theta(n+1) <= theta(n)
    expected = np.where(stop.any(1), stop.argmax(1), N)
    np.testing.assert_array_equal(tree.num_nodes.numpy(), expected)
    assert 0 < expected.min() and expected.max() < N and len(set(expected.tolist())) > 3  # a non-trivial check


# ---------------------------------------------------------------------------------------------------
# JSON errors


def _valid_dict():
    return CostModel([0, 1, 2], [0, 100], [[1.0, 2.0, 3.5], [1.5, 2.5, 4.0]], 0.5).to_dict()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(version=3), r"version 3 is newer than this ddtree supports \(2\)"),
        (lambda d: d.update(version="1"), r"'version' must be a positive integer"),
        (lambda d: d.update(format="something-else"), r"not a ddtree cost model"),
        (lambda d: d.pop("verify_ms"), r"missing 'verify_ms'"),
        (lambda d: d.update(verify_ms=[[1.0, 2.0, 3.0]]), r"verify_ms must have shape"),
        (lambda d: d.update(verify_ms=[[1.0, 3.0, 4.0], [1.0, 2.0, 3.0]]), r"context 0: .*not convex"),
        (lambda d: d.update(verify_ms=[[2.0, 1.0, 1.0], [1.0, 2.0, 3.0]]), r"decreasing"),
        (lambda d: d.update(verify_ms=[[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]]), r"finite and positive"),
        (lambda d: d.update(node_grid=[0, 2, 1]), r"node_grid must be .*strictly increasing"),
        (lambda d: d.update(contexts=[0.5, 100]), r"'contexts' must be a list of integers"),
        (lambda d: d.update(draft_cost_ms="fast"), r"malformed field"),
        (lambda d: d.update(units="s"), r"'units' must be 'ms'"),
    ],
)
def test_bad_json_raises_value_error(tmp_path, mutate, message):
    d = _valid_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message):
        CostModel.load(path)


def test_truncated_and_non_object_json(tmp_path):
    text = json.dumps(_valid_dict())
    path = tmp_path / "t.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        CostModel.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be an object"):
        CostModel.load(path)
    path.write_text(text)
    assert CostModel.load(path).draft_cost == 0.5


# ---------------------------------------------------------------------------------------------------
# Default estimate


QWEN3_8B = SimpleNamespace(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                           head_dim=128, intermediate_size=12288, vocab_size=151936, model_type="qwen3",
                           _name_or_path="Qwen/Qwen3-8B")


def _seed_rates(tmp_path, monkeypatch, bw=3000.0, tflops=700.0):
    """Point the rate cache at tmp_path and pre-fill it with H100-like rates for this CPU."""
    from ddtree.timing import device_name

    monkeypatch.setenv("DDTREE_CACHE_DIR", str(tmp_path))
    key = f"{device_name(torch.device('cpu'))}|float32"
    (tmp_path / "device_rates.json").write_text(json.dumps({key: {"name": "fake", "bandwidth_gbs": bw, "matmul_tflops": tflops}}))


def test_default_roofline(tmp_path, monkeypatch):
    _seed_rates(tmp_path, monkeypatch)
    model = CostModel.default(QWEN3_8B, device="cpu")
    # Weight bytes read per forward, by hand: 36 layers x (q,k,v,o 4096*128*80 + MLP 3*4096*12288) + LM head
    # 151936*4096 = 7.5697e9 parameters, 2 bytes each in bf16 -> 5.046 ms at 3 TB/s.
    floor = 36 * (4096 * 128 * 80 + 3 * 4096 * 12288) + 151936 * 4096
    overhead = OVERHEAD_MS + 36 * OVERHEAD_MS_PER_LAYER
    assert model.verify_cost(0, 0)[0] == pytest.approx(overhead + 2 * floor / 3e9, rel=1e-9)
    assert model.draft_cost == pytest.approx(DRAFT_FRACTION * model.verify_cost(0, 0)[0])
    # Compute bound once (n+1) * 2 * params / 700 TFLOP/s exceeds the weight read: n+1 > 2 * 700e12 / 3e12.
    knee = 2 * 700 / 3 / 2  # tokens where 2*P*(n+1)/rate == 2*P/bw  (2 bytes per parameter)
    c = model.verify_cost(np.arange(1025), 0)
    assert c[math.floor(knee) - 1] == pytest.approx(c[0], rel=1e-12) and c[math.ceil(knee)] > c[0]
    assert c[1024] == pytest.approx(overhead + 1025 * 2 * floor / 700e9, rel=1e-9)

    table = model.table(torch.tensor([0, 4096, 65536, 200000]), 1024, max_context=1 << 18).double().numpy()
    assert np.all(np.diff(table, axis=1) >= 0) and np.all(np.diff(table, axis=0) > 0)
    assert np.diff(table, 2, axis=1).min() >= -4 * np.finfo(np.float32).eps * table.max()
    assert model.meta["model"]["num_hidden_layers"] == 36 and model.meta["model"]["name_or_path"] == "Qwen/Qwen3-8B"

    drafter = SimpleNamespace(hidden_size=4096, num_hidden_layers=5, num_attention_heads=32, num_key_value_heads=8,
                              head_dim=128, intermediate_size=12288, vocab_size=151936, block_size=16)
    with_drafter = CostModel.default(QWEN3_8B, device="cpu", drafter_config=drafter)
    assert 0 < with_drafter.draft_cost < with_drafter.verify_cost(0, 0)[0]

    path = tmp_path / "default.json"
    model.save(path)
    np.testing.assert_array_equal(CostModel.load(path).table(torch.tensor([100]), 64).numpy(), model.table(torch.tensor([100]), 64).numpy())


def test_device_rates_measured_once_and_cached(tmp_path, monkeypatch):
    from ddtree.timing import device_rates

    monkeypatch.setenv("DDTREE_CACHE_DIR", str(tmp_path))
    first = device_rates("cpu")
    assert first["bandwidth_gbs"] > 0 and first["matmul_tflops"] > 0
    assert (tmp_path / "device_rates.json").exists()
    assert device_rates("cpu") == first  # read back, not re-measured (a measurement would differ)


# ---------------------------------------------------------------------------------------------------
# profile() on a tiny fake runner


class FakeRunner:
    """Implements the runner interface's reset / verify / context_lens; verify does a matmul whose size
    grows with the tree's slot count, and checks the tree it is given."""

    def __init__(self, work: bool = True):
        self.work = work
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.vocab_size = 1000
        self.config = SimpleNamespace(hidden_size=64, num_hidden_layers=2, model_type="fake", _name_or_path="fake/tiny")
        self.weight = torch.randn(256, 256)
        self.context_lens = None
        self.calls = []

    def reset(self, batch_size, max_len):
        self.max_len = max_len
        self.context_lens = torch.zeros(batch_size, dtype=torch.int64)

    def verify(self, tree):
        B, T = tree.tokens.shape
        assert int(tree.num_nodes.min()) == int(tree.num_nodes.max()) == T - 1  # exactly n nodes, T = n + 1
        assert torch.equal(tree.positions, self.context_lens[:, None] + tree.depths.long())
        assert int(self.context_lens.max()) + T <= self.max_len
        self.calls.append((int(self.context_lens[0]), T))
        x = torch.ones(T * 32 if self.work else 1, 256)
        for _ in range(2):
            x = x @ self.weight
        return torch.zeros(B, T, self.vocab_size), torch.zeros(B, T, 128)


def test_profile_end_to_end_on_fake_runner(tmp_path):
    runner = FakeRunner()
    drafts = []
    model = profile(runner, lambda: drafts.append(1), max_nodes=32, contexts=[256, 0], warmup=1, repeats=3, progress=False)

    grid = default_node_grid(32)
    assert model.node_grid == grid and model.contexts == [0, 256]
    assert runner.max_len >= 256 + 32 + 1
    assert len(runner.calls) == 2 * len(grid) * 4 and {c for c, _ in runner.calls} == {0, 256}
    assert {t for _, t in runner.calls} == {n + 1 for n in grid}
    assert len(drafts) == 4 and model.draft_cost >= 0 and model.meta["profile"]["draft_cost"] == "measured"
    assert np.array(model.measured["verify_median_ms"]).shape == (2, len(grid))
    assert np.all(np.array(model.measured["verify_iqr_ms"]) >= 0)
    assert model.meta["model"]["name_or_path"] == "fake/tiny" and model.meta["device"]["name"]
    _assert_monotone_convex(grid, model.verify_ms, TOL64 * model.verify_ms.max())

    path = tmp_path / "profile.json"
    model.save(path)
    loaded = CostModel.load(path)
    assert loaded.meta["profile"]["repeats"] == 3 and loaded.measured == model.measured
    table = loaded.table(runner.context_lens, 32)
    assert table.shape == (1, 33) and math.isfinite(float(table.sum()))


def test_profile_medians_and_fit_with_a_fake_clock(monkeypatch):
    """Real timings on a shared CPU are too noisy to assert values; with a deterministic clock the
    profile must report the exact medians and IQRs per (l, n) and fit them back."""
    import ddtree.timing as timing

    runner = FakeRunner(work=False)
    truth = lambda l, T: 1.0 + 0.01 * l + 0.05 * T + 0.002 * T * T  # noqa: E731  convex in T, ms
    jitter = iter([0.0, 1.0, -1.0, 0.5, -0.5] * 10_000)  # per sample: median offset 0, IQR 1.0

    def fake_time_ms(fn, device):
        fn()
        ctx, T = runner.calls[-1]
        return truth(ctx, T) + next(jitter)

    monkeypatch.setattr(timing, "time_ms", fake_time_ms)
    model = profile(runner, None, max_nodes=40, contexts=[0, 300, 1000], warmup=2, repeats=5, progress=False)
    grid = np.array(default_node_grid(40))
    expect = np.array([[truth(l, n + 1) for n in grid] for l in (0, 300, 1000)])
    np.testing.assert_allclose(model.measured["verify_median_ms"], expect, rtol=1e-12)
    np.testing.assert_allclose(model.measured["verify_iqr_ms"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(model.verify_ms, expect, rtol=1e-9)  # already convex: fitted exactly
    assert model.draft_cost == pytest.approx(DRAFT_FRACTION * truth(0, 1))  # no drafter: estimated
    assert model.meta["profile"]["draft_cost"] == "estimated"
    # Between profiled contexts the table interpolates linearly (truth is linear in l).
    # 608 is the centre of bucket 9 (64-token buckets); grid points only (truth is quadratic between them).
    np.testing.assert_allclose(model.table(torch.tensor([600]), 40)[0, grid].double().numpy(),
                               [truth(608, n + 1) for n in grid], rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_table_on_cuda_is_a_sync_free_gather():
    model, _ = _a800("Qwen3-8B")
    ctx = torch.tensor([0, 1000, 5000, 40000])
    expect = model.table(ctx, 128)
    model.table(ctx.cuda(), 128)  # builds and uploads the CUDA cache (one copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
    try:
        got = model.table(ctx.cuda(), 128)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.device.type == "cuda" and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), expect, rtol=0, atol=0)
