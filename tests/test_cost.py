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
from ddtree.cost import (CostModel, DRAFT_FRACTION, OVERHEAD_MS, OVERHEAD_MS_PER_LAYER, VERSION, default_node_grid,
                         profile)
from ddtree.cost_fit import eval_curves, fit_monotone

DATA = Path(__file__).parent / "data" / "caddtree_cost_curves_a800.json"
# float64 rounding of sums of O(100) ms values: far below any real violation of monotonicity.
TOL64 = 1e-12


def _assert_monotone(n, v, tol):
    slopes = np.diff(v, axis=-1) / np.diff(np.asarray(n, dtype=np.float64))
    assert slopes.min() >= -tol, f"decreasing: min slope {slopes.min()}"


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


def test_fit_recovers_noisy_increasing_curve():
    rng = np.random.default_rng(0)
    n = np.array(default_node_grid(512), dtype=np.float64)
    truth = 30.0 + 0.004 * n + 0.05 * np.maximum(n - 128, 0) + 2e-5 * n**2  # ms, convex, increasing
    sigma = 0.3
    y = truth + rng.normal(0.0, sigma, n.shape)
    y[1] = y[0] - 1.0  # a dip at the start, as noisy small-n timings often have
    fit = fit_monotone(n, y)

    _assert_monotone(n, fit, TOL64 * fit.max())
    # Least squares over a set containing the truth: never worse than the truth itself.
    assert np.sum((fit - y) ** 2) <= np.sum((truth - y) ** 2) * (1 + 1e-9)
    assert np.sqrt(np.mean((fit - truth) ** 2)) < sigma
    # Exact data is recovered exactly.
    np.testing.assert_allclose(fit_monotone(n, truth), truth, rtol=1e-9)

    # Past the grid (and below it) the curve stays non-decreasing: integers 0..2048.
    x = np.arange(0, 2049)
    vals = eval_curves(n, fit, x)
    assert np.all(np.diff(vals) >= 0)
    np.testing.assert_array_equal(eval_curves(n, fit, n), fit)  # exact at the knots


def test_fit_keeps_concave_data_and_pools_dips():
    # A CPU's fp32 verify (this project's 2-core machine, ms at n = 0..256): steep over the first rows,
    # then slow. Increasing data is its own best non-decreasing fit, concave or not.
    n = np.array([0, 4, 8, 16, 32, 64, 128, 256], dtype=np.float64)
    cpu = np.array([103.0, 205.0, 274.0, 303.0, 331.0, 470.0, 698.0, 1368.0])
    np.testing.assert_allclose(fit_monotone(n, cpu), cpu, rtol=1e-12)
    np.testing.assert_allclose(fit_monotone(np.arange(33.0), np.sqrt(np.arange(33.0))), np.sqrt(np.arange(33.0)),
                               atol=1e-12)
    # A dip is pooled with its neighbour (the least-squares non-decreasing answer: their mean), weights
    # shift the pooled value towards the heavier sample.
    np.testing.assert_allclose(fit_monotone([0, 1, 2, 3], [1.0, 3.0, 2.0, 4.0]), [1.0, 2.5, 2.5, 4.0], atol=1e-12)
    np.testing.assert_allclose(fit_monotone([0, 1, 2, 3], [1.0, 3.0, 2.0, 4.0], weights=[1, 3, 1, 1]),
                               [1.0, 2.75, 2.75, 4.0], atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# The published A800 curves through fit, JSON and table


@pytest.mark.parametrize("name", ["Qwen3-4B", "Qwen3-8B"])
def test_a800_curves_survive_fit_save_load(name, tmp_path):
    model, med = _a800(name)
    # The published curves are already monotone (convex) fits (rounded to 6 digits): the refit stays on them.
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

    # The device table: exact within a bucket's centre, monotone in float32.
    ctx = torch.tensor([1, 1000, 4000, 4500, 8000, 12000])
    table = loaded.table(ctx, 600)
    assert table.shape == (6, 601) and table.dtype == torch.float32 and table.device == ctx.device
    t = table.double().numpy()
    assert np.all(np.diff(t, axis=1) >= 0)
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
        (lambda d: d.update(verify_ms=[[2.0, 1.0, 1.0], [1.0, 2.0, 3.0]]), r"context 0: .*decreasing at n"),
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
        self.batches = []  # the batch size of each verify call

    def reset(self, batch_size, max_len):
        self.max_len = max_len
        self.context_lens = torch.zeros(batch_size, dtype=torch.int64)

    def verify(self, tree):
        B, T = tree.tokens.shape
        assert int(tree.num_nodes.min()) == int(tree.num_nodes.max()) == T - 1  # exactly n nodes, T = n + 1
        assert torch.equal(tree.positions, self.context_lens[:, None] + tree.depths.long())
        assert int(self.context_lens.max()) + T <= self.max_len
        assert B == self.context_lens.shape[0]  # the tree has the batch reset set up
        self.calls.append((int(self.context_lens[0]), T))
        self.batches.append(B)
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
    _assert_monotone(grid, model.verify_ms, TOL64 * model.verify_ms.max())

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
    np.testing.assert_allclose(model.verify_ms, expect, rtol=1e-9)  # already increasing: fitted exactly
    assert model.draft_cost == pytest.approx(DRAFT_FRACTION * truth(0, 1))  # no drafter: estimated
    assert model.meta["profile"]["draft_cost"] == "estimated"
    # Between profiled contexts the table interpolates linearly (truth is linear in l).
    # 608 is the centre of bucket 9 (64-token buckets); grid points only (truth is quadratic between them).
    np.testing.assert_allclose(model.table(torch.tensor([600]), 40)[0, grid].double().numpy(),
                               [truth(608, n + 1) for n in grid], rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["request", "batch", "ragged"])
def test_table_on_cuda_is_a_sync_free_gather(mode):
    model, _ = _a800("Qwen3-8B")
    ctx = torch.tensor([0, 1000, 5000, 40000])
    expect = model.table(ctx, 128, mode=mode)
    model.table(ctx.cuda(), 128, mode=mode)  # builds and uploads the CUDA cache (one copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
    try:
        got = model.table(ctx.cuda(), 128, mode=mode)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.device.type == "cuda" and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), expect, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Batch curves: padded Cv(B, n; l) per profiled batch size, the modelled ragged cost, the tables per mode

SIZES = [1, 4, 16]


def _truth(B, n, l):
    """A padded verify cost in ms that the model represents exactly: linear in B (interpolation between
    batch sizes), in n (the fit) and in l (interpolation between contexts). Per row a fixed part
    0.5 + 0.001 l, per slot 0.1."""
    return 2.0 + B * (0.5 + 0.001 * np.asarray(l, np.float64)) + 0.1 * B * (np.asarray(n, np.float64) + 1)


def _exact_batch_model(grid=(0, 1, 2, 4, 8, 16), contexts=(0, 4096), drafts=(1.0, 1.5, 3.0)):
    med = np.array([[[_truth(B, n, l) for n in grid] for l in contexts] for B in SIZES])
    return CostModel.fit(list(grid), list(contexts), med, drafts[0], batch_sizes=SIZES, batch_draft_ms=drafts[1:])


def _centre(l, bucket=64):
    return l // bucket * bucket + bucket / 2


def test_batch_fit_is_monotone_per_batch_size():
    rng = np.random.default_rng(3)
    grid = default_node_grid(64)
    n = np.asarray(grid, np.float64)
    contexts = [0, 512]
    # Per batch size a convex increasing truth (slot cost plus a quadratic term once the batch is compute
    # bound), measured with noise that makes the raw medians not monotone.
    truth = np.array([[[5 + 2 * B + 0.01 * l + 0.05 * B * (x + 1) + 1e-4 * (B * (x + 1)) ** 2 for x in n]
                       for l in contexts] for B in SIZES])
    med = truth + rng.normal(0, 0.5, truth.shape)
    model = CostModel.fit(grid, contexts, med, 1.0, batch_sizes=SIZES)
    assert model.batch_sizes == SIZES and model.has_batch_curves
    assert model.batch_verify_ms.shape == (len(SIZES) - 1, len(contexts), len(grid))
    curves = np.concatenate([model.verify_ms[None], model.batch_verify_ms])
    for per_context, per_truth, per_med in zip(curves, truth, med):
        for row, true_row, med_row in zip(per_context, per_truth, per_med):
            _assert_monotone(grid, row, TOL64 * row.max())
            # Least squares over the non-decreasing curves, a set holding the truth: never further from
            # the medians than the truth is (and so within the noise of it).
            assert np.sum((row - med_row) ** 2) <= np.sum((true_row - med_row) ** 2) * (1 + 1e-9)
            assert np.sqrt(np.mean((row - true_row) ** 2)) < 2 * 0.5
    assert model.measured["batch_sizes"] == SIZES and np.array(model.measured["verify_median_ms"]).shape == med.shape


def test_batch_and_ragged_values_follow_the_documented_model():
    model = _exact_batch_model()
    ctx = 300
    n = np.arange(0, 20)  # past the grid's last point (16) too: extended with the last slope
    for B in (1, 2, 4, 9, 16):  # profiled and between: exact (truth is linear in B)
        np.testing.assert_allclose(model.padded_cost(B, n, ctx), _truth(B, n, ctx), rtol=1e-12)
    per_row = 0.5 + 0.001 * ctx  # truth's cost of a row at equal total slots
    for B in (17, 40, 64):  # past the largest: the B = 16 curve at the same total slots, plus the extra rows
        same_slots = _truth(16, B * (n + 1) / 16 - 1, ctx)
        np.testing.assert_allclose(model.padded_cost(B, n, ctx), same_slots + (B - 16) * per_row, rtol=1e-12)
        np.testing.assert_allclose(model.padded_cost(B, n, ctx), _truth(B, n, ctx), rtol=1e-12)  # exact for truth's form
    t = np.arange(0, 5 * 16 + 1)
    for B in (1, 3, 5, 20):  # ragged: B roots + t nodes priced as B rows at the same total slots
        np.testing.assert_allclose(model.ragged_cost(B, t, ctx), model.padded_cost(B, t / B, ctx), rtol=1e-12)
    np.testing.assert_allclose(model.ragged_cost(4, t, ctx), _truth(4, t / 4, ctx), rtol=1e-12)
    # A row that costs nothing extra at equal total slots (or less: noise) adds nothing past the largest size.
    slots_only = CostModel.fit([0, 4], [0], [[[1.0, 5.0]], [[4.0, 20.0]]], 1.0, batch_sizes=[1, 4])  # cost = slots
    np.testing.assert_allclose(slots_only.padded_cost(8, [0, 4], 0), [8.0, 40.0], rtol=1e-12)
    cheaper_rows = CostModel.fit([0, 4], [0], [[[1.0, 5.0]], [[3.0, 19.0]]], 1.0, batch_sizes=[1, 4])
    np.testing.assert_allclose(cheaper_rows.padded_cost(8, [0, 4], 0), cheaper_rows.padded_cost(4, [1, 9], 0),
                               rtol=1e-12)
    # Drafter rounds: linear between profiled sizes, last slope past them.
    assert [model.draft_cost_at(B) for B in (1, 4, 10, 16, 28)] == pytest.approx([1.0, 1.5, 2.25, 3.0, 4.5])
    # Profiled at batch size 1 alone (`ddtree profile --vllm --batches 1`): the batch-1 round at every size,
    # not an IndexError in the engine's first step of two requests.
    one = CostModel.fit([0, 4], [0], [[[1.0, 5.0]]], 2.0, batch_sizes=[1], batch_draft_ms=[])
    assert [one.draft_cost_at(B) for B in (1, 2, 64)] == [2.0, 2.0, 2.0]
    assert CostModel.from_dict(one.to_dict()).draft_cost_at(8) == 2.0


@pytest.mark.parametrize("B", [1, 3, 4, 16, 50])
def test_table_shapes_and_values_per_mode(B):
    model = _exact_batch_model()
    N = 12
    lens = torch.arange(B, dtype=torch.int64) * 97 % 4000 + 5  # ragged contexts, within the profiled ones
    mean = int(lens.sum()) // B
    request, batch, ragged = (model.table(lens, N, 4096, mode=m) for m in ("request", "batch", "ragged"))
    assert request.shape == (B, N + 1) and batch.shape == (1, N + 1) and ragged.shape == (1, B * N + 1)
    assert request.dtype == batch.dtype == ragged.dtype == torch.float32
    n, t = np.arange(N + 1), np.arange(B * N + 1)
    f32 = 4 * np.finfo(np.float32).eps
    want_request = np.stack([_truth(1, n, _centre(int(l))) for l in lens])
    np.testing.assert_allclose(request.double().numpy(), want_request, rtol=f32)
    np.testing.assert_allclose(batch[0].double().numpy(), model.padded_cost(B, n, _centre(mean)), rtol=f32)
    np.testing.assert_allclose(ragged[0].double().numpy(), model.padded_cost(B, t / B, _centre(mean)), rtol=f32)
    # Within the profiled batch sizes and past them (truth's form is what the extrapolation assumes): the truth.
    np.testing.assert_allclose(batch[0].double().numpy(), _truth(B, n, _centre(mean)), rtol=f32)
    # Non-decreasing rows (what a cost is; this truth is convex too and the tables keep it so).
    for row in (batch[0], ragged[0]):
        v = row.double().numpy()
        assert np.all(np.diff(v) >= 0) and np.diff(v, 2).min() >= -f32 * v.max()
    # Cached per (mode, B): another batch of the same size is a gather, no rebuild.
    cached = len(model._tables)
    model.table(lens.flip(0) + 1, N, 4096, mode="ragged")
    model.table(lens + 64, N, 4096, mode="batch")
    assert len(model._tables) == cached


def test_model_without_batch_curves_falls_back_to_total_slots():
    """A batch-1 model (a version-1 file, CostModel.default) prices B requests of n nodes as one request
    with B(n+1)-1 nodes, and B roots + t nodes as one request with B+t-1 nodes."""
    model, _ = _a800("Qwen3-8B")
    assert model.batch_sizes == [1] and not model.has_batch_curves
    B, N, ctx = 6, 40, 2000
    lens = torch.full((B,), ctx)
    batch = model.table(lens, N, 4096, mode="batch")[0].double().numpy()
    ragged = model.table(lens, N, 4096, mode="ragged")[0].double().numpy()
    f32 = 4 * np.finfo(np.float32).eps
    n, t = np.arange(N + 1), np.arange(B * N + 1)
    np.testing.assert_allclose(batch, model.verify_cost(B * (n + 1) - 1, _centre(ctx)), rtol=f32)
    np.testing.assert_allclose(ragged, model.verify_cost(B + t - 1, _centre(ctx)), rtol=f32)
    assert model.draft_cost_at(B) == model.draft_cost  # no per-batch drafter profile: the same Cd
    assert model.to_dict()["batch_model"]["padded"].startswith("estimated")


def test_batch_model_json_round_trip(tmp_path):
    model = _exact_batch_model()
    model.meta["note"] = "kept"
    path = tmp_path / "m.json"
    model.save(path)
    d = json.loads(path.read_text())
    assert d["version"] == VERSION == 2 and d["batch_sizes"] == SIZES
    assert "not measured" in d["batch_model"]["ragged"] and "mean context" in d["batch_model"]["contexts"]
    loaded = CostModel.load(path)
    assert loaded.batch_sizes == SIZES and loaded.batch_draft_ms == model.batch_draft_ms
    np.testing.assert_array_equal(loaded.batch_verify_ms, model.batch_verify_ms)
    np.testing.assert_array_equal(loaded.verify_ms, model.verify_ms)
    assert loaded.meta["note"] == "kept" and loaded.measured == model.measured
    lens = torch.tensor([10, 700, 30])
    for mode in ("request", "batch", "ragged"):
        torch.testing.assert_close(loaded.table(lens, 8, mode=mode), model.table(lens, 8, mode=mode), rtol=0, atol=0)
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


def test_version_1_file_still_loads(tmp_path):
    """A file as the version-1 code's to_dict wrote it (no batch fields) loads as a batch-1 model."""
    v1 = {
        "format": "ddtree-cost-model", "version": 1, "units": "ms", "source": "profile",
        "created": "2026-11-30T12:00:00+0000", "device": {"name": "cpu"},
        "software": {"torch": "2.14.1", "ddtree": "0.1.0"},
        "model": {"name_or_path": "x", "model_type": "qwen3", "config_hash": "0" * 16, "num_hidden_layers": 2,
                  "hidden_size": 64, "dtype": "float32"},
        "profile": {"warmup": 3, "repeats": 10, "batch_size": 1, "seed": 0, "draft_cost": "measured"},
        "draft_cost_ms": 0.5, "contexts": [0, 100], "node_grid": [0, 1, 2],
        "verify_ms": [[1.0, 2.0, 3.5], [1.5, 2.5, 4.0]],
        "measured": {"verify_median_ms": [[1.0, 2.0, 3.5], [1.5, 2.5, 4.0]], "draft_median_ms": 0.5},
    }
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(v1))
    model = CostModel.load(path)
    assert model.batch_sizes == [1] and not model.has_batch_curves and model.batch_draft_ms is None
    np.testing.assert_array_equal(model.verify_ms, v1["verify_ms"])
    assert model.draft_cost == 0.5 and model.meta["profile"]["repeats"] == 10
    batch = model.table(torch.tensor([50, 50]), 2, 128, mode="batch")  # B = 2: the batch-1 curve at 2(n+1) slots
    np.testing.assert_allclose(batch[0].double().numpy(), model.verify_cost([1, 3, 5], 32), rtol=1e-6)
    assert CostModel.from_dict(model.to_dict()).to_dict() == model.to_dict()  # re-saved as version 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_sizes=[1, 4, 4]), r"batch_sizes must be positive, strictly increasing"),
        (dict(batch_sizes=[4, 16]), r"start at 1"),
        (dict(batch_sizes=[0, 4]), r"batch_sizes must be positive"),
        (dict(batch_sizes=[1, 2.5]), r"batch_sizes must be integers"),
        (dict(batch_sizes=[1, 4], batch_verify_ms=np.ones((2, 2, 3))),
         r"batch_verify_ms must have shape .* = \[1, 2, 3\], got \[2, 2, 3\]"),
        (dict(batch_sizes=[1, 4], batch_verify_ms=[[[1.0, 3.0, 2.0], [1.0, 2.0, 3.0]]]),
         r"batch size 4, context 0: .*decreasing at n"),
        (dict(batch_sizes=[1, 4], batch_verify_ms=[[[1.0, 2.0, 3.0], [1.0, 2.0, math.nan]]]), r"finite and positive"),
        (dict(batch_sizes=[1, 4], batch_verify_ms=np.ones((1, 2, 3)), batch_draft_ms=[1.0, 2.0]),
         r"batch_draft_ms must hold 1"),
    ],
)
def test_bad_batch_curves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CostModel([0, 1, 2], [0, 100], [[1.0, 2.0, 3.5], [1.5, 2.5, 4.0]], 0.5, **kwargs)


def test_bad_mode_and_batch_size():
    model = _exact_batch_model()
    with pytest.raises(ValueError, match=r"unknown budget mode 'padded'; choose from request, batch, ragged"):
        model.table(torch.tensor([3]), 4, mode="padded")
    with pytest.raises(ValueError, match=r"context_lens must be \[B\] with B >= 1"):
        model.table(torch.zeros(0, dtype=torch.int64), 4, mode="batch")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            model.padded_cost(bad, [0, 1], 0)
    with pytest.raises(ValueError, match="batch_sizes must be positive integers, strictly increasing, starting at 1"):
        profile(FakeRunner(), None, max_nodes=4, contexts=[0], batch_sizes=[1, 8, 4], progress=False)
    with pytest.raises(ValueError, match="drafter_round_at"):
        profile(FakeRunner(), lambda: None, max_nodes=4, contexts=[0], batch_sizes=[1, 4], progress=False)


def test_profile_batch_sizes_with_a_fake_clock(monkeypatch):
    """profile(batch_sizes=...) times every batch size's padded forwards and drafter rounds and fits them."""
    import ddtree.timing as timing

    runner = FakeRunner(work=False)
    truth = lambda B, l, T: 1.0 + 0.01 * l * B + 0.05 * B * T + 0.002 * (B * T) ** 2  # noqa: E731
    jitter = iter([0.0, 1.0, -1.0, 0.5, -0.5] * 10_000)

    def fake_time_ms(fn, device):
        fn()
        if hasattr(fn, "batch"):  # a drafter round
            return 2.0 + 0.25 * fn.batch + next(jitter)
        return truth(runner.batches[-1], *runner.calls[-1]) + next(jitter)

    def round_at(B):
        fn = lambda: None  # noqa: E731
        fn.batch = B
        return fn

    monkeypatch.setattr(timing, "time_ms", fake_time_ms)
    model = profile(runner, None, max_nodes=8, contexts=[0, 200], batch_sizes=[1, 4, 8], drafter_round_at=round_at,
                    warmup=1, repeats=5, progress=False)
    grid = np.array(default_node_grid(8))
    expect = np.array([[[truth(B, l, n + 1) for n in grid] for l in (0, 200)] for B in (1, 4, 8)])
    assert sorted(set(runner.batches)) == [1, 4, 8]
    np.testing.assert_allclose(model.measured["verify_median_ms"], expect, rtol=1e-12)
    np.testing.assert_allclose(model.verify_ms, expect[0], rtol=1e-9)
    np.testing.assert_allclose(model.batch_verify_ms, expect[1:], rtol=1e-9)
    assert model.draft_cost == pytest.approx(2.25) and model.batch_draft_ms == pytest.approx([3.0, 4.0])
    assert model.meta["profile"]["batch_sizes"] == [1, 4, 8] and "varlen" in model.meta["profile"]["ragged"]
