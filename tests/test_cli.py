"""The ``ddtree`` command line, run as a user would (``python -m ddtree`` in a subprocess): the demo, a
streamed generation from saved folders and a profile. Its answers to mistakes (one line
``ddtree: error: ...``, exit code 2, no traceback, before any work) are in test_cli_errors.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from models import save_pair, tiny_drafter, tiny_target


def ddtree(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "ddtree", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    target, drafter = save_pair(root, "qwen3", seed=41, block_size=4)
    # Drafters that do not fit the target: another hidden size, another vocabulary.
    tiny_drafter(tiny_target("qwen3", hidden_size=32, head_dim=8).config).save_pretrained(root / "wrong_hidden")
    tiny_drafter(tiny_target("qwen3", vocab_size=64).config).save_pretrained(root / "wrong_vocab")
    return root, target, drafter


def _check_demo_output(stdout: str) -> None:
    for method in ("ar", "dflash", "ddtree", "caddtree"):
        assert f"[{method:8s}] acceptance length" in stdout
    assert stdout.count("(same tokens as ar)") == 3 and "DIFFERS" not in stdout
    tree = stdout.split("the first round's draft tree")[1].splitlines()[1:]
    assert tree[0].startswith("root ") and len(tree) == 13  # the root and 12 nodes
    assert all("p=" in line and "path=" in line for line in tree[1:])


@pytest.mark.parametrize("extra, block", [([], 16), (["--drafter-block", "8"], 8)], ids=["default", "block8"])
def test_demo_trained_pair(extra, block):
    import time

    t0 = time.perf_counter()
    r = ddtree("demo", "--device", "cpu", *extra)  # the defaults a user gets, then the other shipped drafter
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - t0 < 60, "the CPU demo finishes in under a minute"
    assert "trained offline" in r.stdout and "RANDOMLY" not in r.stdout
    assert f"drafter of block size {block}," in r.stdout and "CaDDTree's cost model (" in r.stdout
    _check_demo_output(r.stdout)


def test_demo_random_pair():
    r = ddtree("demo", "--device", "cpu", "--random", "--max-new-tokens", "12", "--max-nodes", "16")
    assert r.returncode == 0, r.stderr
    assert "RANDOMLY initialised" in r.stdout and "acceptance length of about 1" in r.stdout
    _check_demo_output(r.stdout)


def test_generate_streams_and_reports(folders):
    _, target, drafter = folders
    r = ddtree("generate", "--target", str(target), "--drafter", str(drafter), "--prompt", "Hello tree",
               "--method", "caddtree", "--max-new-tokens", "10", "--max-nodes", "8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    text, summary = r.stdout.split("\n--\n")
    assert text.startswith("Hello tree") and len(text) > len("Hello tree")
    assert "acceptance length" in summary and "tree size" in summary and "tokens/s" in summary


def test_generate_defaults_to_the_shipped_pair():
    r = ddtree("generate", "--prompt", "    def __len__(self):", "--max-new-tokens", "40", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    text, summary = r.stdout.split("\n--\n")
    assert text.startswith("    def __len__(self):") and len(text) > 30
    accept = float(summary.split("acceptance length")[1].split()[0])
    assert accept > 2.0, summary  # the trained drafter, not a random one


def test_profile_then_generate_with_the_cost_model(folders, tmp_path):
    _, target, drafter = folders
    out = tmp_path / "cost.json"
    r = ddtree("profile", "--target", str(target), "--drafter", str(drafter), "--max-nodes", "8", "--contexts", "8,32",
               "--repeats", "2", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    cost = json.loads(out.read_text())
    assert cost["profile"]["draft_cost"] == "measured" and cost["draft_cost_ms"] > 0
    r = ddtree("generate", "--target", str(target), "--drafter", str(drafter), "--prompt", "ab", "--method", "caddtree",
               "--cost-model", str(out), "--max-new-tokens", "6", "--max-nodes", "8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "method caddtree: acceptance length" in r.stdout


def test_profile_batch_sizes_then_generate_with_each_budget_mode(folders, tmp_path):
    _, target, drafter = folders
    out = tmp_path / "cost.json"
    r = ddtree("profile", "--target", str(target), "--drafter", str(drafter), "--max-nodes", "4", "--contexts", "8",
               "--repeats", "2", "--batch-sizes", "1,2,4", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    cost = json.loads(out.read_text())
    assert cost["version"] == 2 and cost["batch_sizes"] == [1, 2, 4] and cost["profile"]["batch_sizes"] == [1, 2, 4]
    assert len(cost["batch_verify_ms"]) == 2 and len(cost["batch_draft_ms"]) == 2  # batches 2 and 4
    assert cost["batch_model"]["padded"].startswith("measured") and "not measured" in cost["batch_model"]["ragged"]
    texts = []
    for mode in ("request", "batch", "ragged"):
        r = ddtree("generate", "--target", str(target), "--drafter", str(drafter), "--prompt", "ab", "--method",
                   "caddtree", "--cost-model", str(out), "--budget-mode", mode, "--max-new-tokens", "6", "--max-nodes",
                   "4", "--device", "cpu", "--ignore-eos")
        assert r.returncode == 0, r.stderr
        texts.append(r.stdout.split("\n--\n")[0])
    assert texts[0] == texts[1] == texts[2]  # greedy: the target's own text whatever the budget
