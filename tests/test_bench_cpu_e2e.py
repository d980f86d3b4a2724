"""The CPU end-to-end benchmark (bench/bench_cpu_e2e.py) in --quick mode: every method runs through the
shipped decode loop and reports what its table rests on (a tiny model, seconds)."""
from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_cpu_e2e.py"


def load_bench():
    sys.path.insert(0, str(BENCH.parent))  # it imports bench_e2e from its own folder
    spec = importlib.util.spec_from_file_location("bench_cpu_e2e", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_every_method(tmp_path):
    bench = load_bench()
    res = bench.main(["--quick", "--new-tokens", "24", "--repeats", "1", "--passes", "1", "--dtype", "float32,bfloat16",
                      "--out", str(tmp_path)])
    assert list(res["dtypes"]) == ["float32", "bfloat16"]
    for section in res["dtypes"].values():
        check_section(bench, section)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "tokens_per_s_vs_budget.png").is_file()


def check_section(bench, section):
    runs = {(r["method"], r["budget"]): r for r in section["runs"]}
    assert ("ar", None) in runs and ("dflash", None) in runs and ("caddtree", None) in runs
    assert {b for m, b in runs if m == "ddtree"} == set(bench.BUDGETS)
    assert any(m.startswith("transformers") for m, _ in runs)
    for (method, budget), r in runs.items():
        assert r["tokens"] >= 23 and r["tokens_per_s"] > 0
        if method.startswith("transformers") or method == "ar":
            assert r["acceptance"] == 1.0
        else:
            assert 1.0 <= r["acceptance"] <= 16  # at most the drafter's block (15 drafted + the bonus)
        if method == "ddtree":
            assert statistics.mean(r["budgets"]) == budget  # a fixed budget is always filled (K^D >> 256)
        if method == "caddtree":
            assert max(r["budgets"]) <= max(bench.BUDGETS)
    summary = section["summary"]
    assert summary["best_fixed_budget"] in bench.BUDGETS and summary["caddtree_over_best_fixed"] > 0


def test_bad_dtype_is_refused_by_name(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--dtype", "float16"])
    assert "--dtype" in capsys.readouterr().err


def test_quick_real_run_reports_every_method(tmp_path):
    """--real --quick: the shipped drafter on a small scaled target (logits the shipped target's), every
    method, the batch and ragged CaDDTree modes at both batch sizes, and every batch-1 method's text the same."""
    bench = load_bench()
    res = bench.main(["--real", "--quick", "--new-tokens", "16", "--repeats", "1", "--passes", "1", "--dtype",
                      "float32", "--out", str(tmp_path)])
    section = res["dtypes"]["float32"]
    runs = {r["method"]: r for r in section["runs"]}
    assert {"ar", "dflash", "caddtree"} <= set(runs) and any(m.startswith("transformers") for m in runs)
    assert {r["budget"] for r in section["runs"] if r["method"] == "ddtree"} == set(bench.REAL_BUDGETS)
    for B in bench.REAL_BATCHES:
        for mode in ("batch", "ragged"):
            r = runs[f"caddtree ({mode}, batch {B})"]
            assert r["batch"] == B and r["tokens"] == B * 15 and max(r["budgets"]) <= max(bench.REAL_BUDGETS)
    for r in section["runs"]:
        assert r["tokens_per_s"] > 0 and 1.0 <= r["acceptance"] <= 8  # at most the block (7 drafted + the bonus)
        if r.get("batch") == 1:
            assert r["same_as_ar"], r["method"]
    assert runs["dflash"]["acceptance"] > 1.5  # a trained drafter on its own target's logits: real acceptance
    assert section["summary"]["every_method_same_as_ar"]
    assert (tmp_path / "results.json").is_file()


def test_scaled_and_drafter_need_real(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--drafter", "x"])
    assert "--real" in capsys.readouterr().err


def test_real_run_batches_option(tmp_path, capsys):
    """--batches: which batch sizes the batch and ragged modes run (none: batch 1 only); bad values refused."""
    bench = load_bench()
    res = bench.main(["--real", "--quick", "--new-tokens", "8", "--repeats", "1", "--passes", "1", "--dtype",
                      "float32", "--batches", "none"])
    section = res["dtypes"]["float32"]
    assert all(r.get("batch", 1) == 1 for r in section["runs"])
    assert section["cost"] and "caddtree" in {r["method"] for r in section["runs"]}
    for bad in ("1", "x"):
        with pytest.raises(SystemExit):
            bench.main(["--real", "--quick", "--batches", bad])
        assert "--batches" in capsys.readouterr().err
