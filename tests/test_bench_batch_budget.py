"""The batch-budget benchmark (bench/bench_batch_budget.py): its simulation follows the greedy
continuation exactly (synthetic drafters with known acceptance; real generate runs of the shipped pair),
its cost sources read the published curve as stated, and a --quick run keeps the promises the full
run's conclusions rest on (B = 1: batch = ragged = per-request; every policy commits the greedy text)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_batch_budget.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_batch_budget", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def synthetic(bench, R=3, M=11, D=3, V=12, seed=0, perfect=True):
    """Requests whose drafter puts its top-1 on the greedy token at every depth (``perfect``), or its
    lowest logit there."""
    g = torch.Generator().manual_seed(seed)
    greedy = torch.randint(3, V, (R, M + D + 1), generator=g)
    logits = torch.randn(R, M, D, V, generator=g)
    for r in range(R):
        for k in range(1, M):
            for d in range(1, D + 1):
                logits[r, k - 1, d - 1, greedy[r, k - 1 + d]] = 20.0 if perfect else -20.0
    lens = torch.randint(1, 9, (R,), generator=g)
    return bench.Requests([[0] * int(n) for n in lens], lens, greedy, logits, M, D)


def test_perfect_drafter_accepts_the_whole_chain(bench):
    req = synthetic(bench)
    M, D = req.new_tokens, req.depth
    for n in (D, 8, 64):
        trace = bench.simulate(req, [0, 1, 2], bench.Policy(f"fixed-{n}", "fixed", n), None)
        rounds = -(-(M - 1) // (D + 1))  # ceil: every round commits D + 1 tokens
        assert [a.tolist() for a in trace.accepts] == [[D + 1] * 3] * rounds
        assert trace.tokens == 3 * (M - 1)


def test_refill_keeps_the_slots_busy(bench):
    req = synthetic(bench, R=5)
    per_request = -(-(req.new_tokens - 1) // (req.depth + 1))  # rounds each request takes
    trace = bench.simulate(req, [0, 1, 2, 3, 4], bench.Policy("fixed-8", "fixed", 8), None, slots=2)
    assert [len(n) for n in trace.sizes] == [2] * (2 * per_request) + [1] * per_request
    assert trace.tokens == 5 * (req.new_tokens - 1)


def test_drafter_that_never_guesses_right_accepts_nothing(bench):
    req = synthetic(bench, perfect=False)
    trace = bench.simulate(req, [0, 1, 2], bench.Policy("fixed-1", "fixed", 1), None)
    assert len(trace.accepts) == req.new_tokens - 1
    assert all((a == 1).all() for a in trace.accepts)
    assert trace.tokens == 3 * (req.new_tokens - 1)


def test_a800_source_reads_the_curve_by_total_slots(bench):
    src = bench.a800_source()
    raw = json.loads(bench.A800_CURVES.read_text())["models"]["Qwen3-8B"]
    curve = np.asarray(raw["verify_cost"]["1"]) * 1e3
    for B, n in ((1, 0), (1, 64), (4, 7), (16, 31)):
        assert src.padded(B, n)[0] == pytest.approx(curve[B * (n + 1) - 1], rel=1e-12)
    for B, t in ((1, 0), (4, 100), (64, 448)):
        assert src.ragged(B, t)[0] == pytest.approx(curve[B + t - 1], rel=1e-12)
    slope = curve[-1] - curve[-2]  # past the published 513 slots: the last slope
    assert src.padded(64, 64)[0] == pytest.approx(curve[-1] + slope * (64 * 65 - 513), rel=1e-9)
    assert src.draft(1) == src.draft(64) == pytest.approx(raw["draft_cost"] * 1e3)


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_batch_budget")
    assert bench.main(["--quick", "--out", str(out)]) == 0
    assert (out / "throughput_vs_batch.png").stat().st_size > 0
    return json.loads((out / "results.json").read_text())


def test_simulation_matches_real_generate_rounds(quick):
    for source, runs in quick["check_against_generate"].items():
        for policy, c in runs.items():
            assert c["greedy_tokens_match"], (source, policy)
            assert c["rounds"] > 0 and c["equal"] == c["rounds"], (source, policy, c)


def test_every_policy_commits_the_greedy_continuation(quick):
    want = quick["requests"] * (quick["new_tokens"] - 1)  # the first token comes from the prefill
    for source, by_b in quick["table"].items():
        for B, rows in by_b.items():
            for name, row in rows.items():
                assert row["tokens"] == want, (source, B, name)
                assert row["acceptance"] >= 1.0 and row["model_ms"] > 0


def test_batch_one_modes_coincide(quick):
    for source, by_b in quick["rounds"].items():
        adaptive = by_b["1"]
        assert adaptive["batch"] == adaptive["caddtree"] == adaptive["ragged"], source
        rows = quick["table"][source]["1"]
        tps = rows["caddtree"]["tokens_per_s"]
        assert rows["batch"]["tokens_per_s"] == pytest.approx(tps, rel=1e-12)
        assert rows["ragged"]["tokens_per_s"] == pytest.approx(tps, rel=1e-12)


def test_batch_mode_gives_every_request_the_same_budget(quick):
    for source, by_b in quick["rounds"].items():
        for sizes in by_b["4"]["batch"]:
            assert len(set(sizes)) == 1, (source, sizes)  # every request has more candidates than N
