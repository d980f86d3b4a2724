"""CaDDTree's costs measured in the vLLM engine: ``ddtree profile --vllm`` and the plugin's cache lookup."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm.v1")  # the real vLLM (a namespace "vllm" would not have it)

from ddtree import demo  # noqa: E402
from ddtree.cost import CostModel  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET, DRAFTER = (str(p) for p in demo.pretrained_pair())


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDTREE_VLLM")}
    # engine_job.py asks the workers which proposer they built by sending them a function.
    return {**env, "DDTREE_VLLM_COST_CACHE": str(cache), "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **extra}


def _errors(proc) -> str:
    out = proc.stdout + proc.stderr
    return "\n".join(line for line in out.splitlines() if "Error" in line and "File " not in line)[-4000:]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    cache = tmp_path_factory.mktemp("costs")
    out = cache.parent / "engine-costs.json"
    proc = subprocess.run([sys.executable, "-m", "ddtree", "profile", "--vllm", "--target", TARGET, "--drafter",
                           DRAFTER, "--batch-sizes", "1,3", "--max-nodes", "4", "--contexts", "24", "--out", str(out)],
                          env=_env(cache), text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, _errors(proc)
    return cache, out, proc.stdout


def test_profile_measures_every_point_in_the_engine(profiled):
    cache, out, stdout = profiled
    cached = list(cache.glob("*.json"))
    assert len(cached) == 1 and f"cached as {cached[0]}" in stdout
    model = CostModel.load(cached[0])
    assert json.loads(out.read_text()) == json.loads(cached[0].read_text())
    assert model.node_grid == [0, 2, 4] and model.batch_sizes == [1, 3] and model.contexts == [24]
    points = model.measured["engine_steps"]
    # Every (batch, nodes) point timed on real steps of exactly that shape, the drafter's round apart;
    # then the top-1 chains of 1, 2 and 4 tokens (the drafter's depth here: min(max nodes, block - 1)).
    trees = [(p["batch"], p["nodes"]) for p in points if not p["chain"]]
    chains = [(p["batch"], p["nodes"]) for p in points if p["chain"]]
    assert sorted(trees) == [(b, n) for b in (1, 3) for n in (0, 2, 4)]
    assert sorted(chains) == [(b, k) for b in (1, 3) for k in (1, 2, 4)]
    assert model.chain.node_grid == [0, 1, 2, 4] and model.chain.batch_sizes == [1, 3]
    # A chain of no tokens is the plain step the trees measured at n = 0.
    assert model.chain.verify_ms[0, 0] == model.verify_ms[0, 0]
    assert model.chain.batch_verify_ms[0, 0, 0] == model.batch_verify_ms[0, 0, 0]
    assert all(p["steps"] >= 1 and p["verify_ms"] > 0 and p["draft_ms"] > 0 for p in points)
    assert model.meta["key"]["dtype"] == "float32" and model.meta["key"]["vllm"].startswith("0.32")
    # Cd(B): the median of the drafter's rounds over the tree sizes (the drafter's forward does not depend on
    # n; the chains' rounds build smaller trees, so they are left out). The chain model carries the same Cd.
    for B, cd in zip((1, 3), [model.draft_cost, *model.batch_draft_ms]):
        rounds = [p["draft_ms"] for p in points if p["batch"] == B and not p["chain"]]
        assert cd == pytest.approx(float(np.median(rounds)))
    assert [model.chain.draft_cost, *model.chain.batch_draft_ms] == [model.draft_cost, *model.batch_draft_ms]


def _caddtree_log(cache: Path, tmp_path: Path, **env) -> str:
    job = {"target": TARGET, "drafter": DRAFTER, "method": "dflash", "num_speculative_tokens": 4,
           "batches": [{"prompts": ["def main("], "sampling": {"temperature": 0.0, "max_tokens": 8}}]}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(HERE / "engine_job.py"), str(path)], text=True, capture_output=True,
                          env=_env(cache, DDTREE_VLLM_TREE="caddtree", **env), timeout=900)
    assert proc.returncode == 0, _errors(proc)
    return proc.stdout + proc.stderr


def test_the_plugin_prices_with_the_cached_measurement(profiled, tmp_path):
    cache, _, _ = profiled
    log = _caddtree_log(cache, tmp_path)
    assert "priced by this engine's measured costs" in log and str(next(cache.glob("*.json"))) in log


def test_without_a_measurement_the_log_names_the_fallback(tmp_path):
    log = _caddtree_log(tmp_path / "empty-cache", tmp_path)
    assert "priced by the built-in roofline estimate: a fallback, not a measurement" in log
    assert "ddtree profile --vllm --target" in log


def test_an_explicit_cost_model_wins(profiled, tmp_path):
    cache, out, _ = profiled
    log = _caddtree_log(cache, tmp_path, DDTREE_VLLM_COST_MODEL=str(out))
    assert f"priced by the cost model {out}" in log
