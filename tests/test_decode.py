"""generate(): every method's greedy output equals transformers' greedy generate token for token
(tiny random Qwen3 and Llama targets, fp32 on CPU), for single prompts and ragged batches, with stop
tokens and a max_new_tokens that is not a multiple of the block; an oracle-ish drafter makes long
accepted paths (and so real KV compaction) happen."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from ddtree import decode
from ddtree.target import HFTarget

from models import OracleDrafter, hf_greedy, tiny_drafter, tiny_target

MAX_NEW = 11  # not a multiple of the block (4) nor of the oracle's block (6)
NUM_PROMPTS = 20


class _Setup:
    def __init__(self, arch: str):
        self.model = tiny_target(arch, seed=21)
        self.V = self.model.config.vocab_size
        self.target = HFTarget(self.model)
        self.drafter = tiny_drafter(self.model.config, block_size=4, seed=22)
        rng = random.Random(23)
        self.prompts = [[rng.randrange(3, self.V) for _ in range(rng.randint(1, 12))] for _ in range(NUM_PROMPTS)]
        self.refs = [hf_greedy(self.model, p, MAX_NEW) for p in self.prompts]
        # A stop token that the greedy continuations actually produce mid-way, plus one that never occurs.
        middle = Counter(t for r in self.refs for t in r[1:-2])
        self.stops = [middle.most_common(1)[0][0], 1]
        self.refs_stop = [hf_greedy(self.model, p, MAX_NEW, self.stops) for p in self.prompts]
        assert sum(len(r) < MAX_NEW for r in self.refs_stop) >= 2, "the stop token should end some requests early"


_SETUPS: dict[str, _Setup] = {}


def setup(arch: str) -> _Setup:
    if arch not in _SETUPS:
        _SETUPS[arch] = _Setup(arch)
    return _SETUPS[arch]


def _batches(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("method", decode.METHODS)
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_transformers(arch, method, batch):
    s = setup(arch)
    use_stops = batch == 4  # batch 1: plain max_new_tokens; batch 4: ragged prompts and stop tokens
    refs = s.refs_stop if use_stops else s.refs
    got = []
    for prompts in _batches(s.prompts, batch):
        out = decode.generate(s.target, s.drafter, prompts, method=method, max_new_tokens=MAX_NEW, max_nodes=8,
                              stop_token_ids=s.stops if use_stops else ())
        got += out.tokens
    assert got == refs


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("method", ["dflash", "ddtree", "caddtree"])
def test_oracle_drafter_long_paths(arch, method):
    """With a drafter that mostly knows the future, rounds accept several tokens; output is unchanged."""
    s = setup(arch)
    drafter = tiny_drafter(s.model.config, block_size=6, seed=24)
    max_new = 23
    prompts = s.prompts[:8]
    refs = [hf_greedy(s.model, p, max_new) for p in prompts]
    got, accept = [], []
    for i, batch in enumerate(_batches(prompts, 4)):
        oracle = OracleDrafter(drafter, [p + r for p, r in zip(batch, refs[4 * i :])], s.V, hit=0.7, seed=i)
        out = decode.generate(s.target, oracle, batch, method=method, max_new_tokens=max_new, max_nodes=12)
        got += out.tokens
        accept.append(out.acceptance_length)
    assert got == refs
    # dflash follows only top-1 guesses (right 70% of the time); trees also hold the runner-up.
    assert min(accept) > (1.8 if method == "dflash" else 2.5), accept


class _Cost:
    """A duck-typed cost model: verifying n nodes costs 1 + slope * n, drafting costs 1."""

    def __init__(self, slope):
        self.slope, self.draft_cost = slope, 1.0

    def table(self, context_lens, max_nodes, max_context):
        n = torch.arange(max_nodes + 1, dtype=torch.float32)
        return (1.0 + self.slope * n).expand(context_lens.shape[0], -1).contiguous()


def test_caddtree_budget_follows_cost_model():
    s = setup("qwen3")
    prompts = s.prompts[:4]
    free = decode.generate(s.target, s.drafter, prompts, method="caddtree", max_new_tokens=MAX_NEW, max_nodes=8,
                           cost_model=_Cost(0.0))
    costly = decode.generate(s.target, s.drafter, prompts, method="caddtree", max_new_tokens=MAX_NEW, max_nodes=8,
                             cost_model=_Cost(1e3))
    assert free.tokens == costly.tokens == s.refs[:4]
    live = lambda out: [n for r in out.rounds for n, a in zip(r.tree_size, r.accept_len) if a]  # noqa: E731
    assert set(live(free)) == {8}  # verification is free: take the whole budget
    assert set(live(costly)) == {0}  # every node costs more than it can return: autoregressive


def test_round_stats():
    s = setup("llama")
    prompts = s.prompts[4:8]
    out = decode.generate(s.target, s.drafter, prompts, method="ddtree", max_new_tokens=MAX_NEW, max_nodes=8,
                          stop_token_ids=s.stops)
    assert out.tokens == s.refs_stop[4:8]
    for r in out.rounds:
        assert len(r.accept_len) == len(r.tree_size) == 4
        assert all(0 <= a <= 4 for a in r.accept_len)  # at most D + 1 = block_size
        assert all(0 <= n <= 8 for n in r.tree_size)
        assert min(r.draft_s, r.build_s, r.verify_s, r.commit_s) >= 0 and r.verify_s > 0
    # Every generated token after the first (the prefill's) was committed by some round.
    for b, toks in enumerate(out.tokens):
        assert sum(r.accept_len[b] for r in out.rounds) >= len(toks) - 1
    assert out.acceptance_length >= 1.0 and out.total_s >= out.prefill_s > 0
    ar = decode.generate(s.target, None, prompts, method="ar", max_new_tokens=5)
    assert ar.acceptance_length == 1.0 and all(n == 0 for r in ar.rounds for n in r.tree_size)
    assert len(ar.rounds) == 4  # the first token comes from the prefill


class _CountingDrafter:
    """The drafter, counting its forwards."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.block_size, self.target_layer_ids = inner.block_size, inner.target_layer_ids

    def reset(self, batch_size, max_len):
        self.inner.reset(batch_size, max_len)

    def draft(self, *args):
        self.calls += 1
        return self.inner.draft(*args)


@pytest.mark.parametrize("method", ["dflash", "ddtree", "caddtree"])
@pytest.mark.parametrize("batch", [1, 4])
def test_no_draft_after_the_last_round(method, batch):
    """A request ended by max_new_tokens costs one drafter forward per round, none after the last one;
    a stop token that ends the batch costs at most one unused draft."""
    s = setup("qwen3")
    for new in (2, MAX_NEW, 3 * MAX_NEW):
        drafter = _CountingDrafter(s.drafter)
        out = decode.generate(s.target, drafter, s.prompts[:batch], method=method, max_new_tokens=new, max_nodes=8)
        assert all(len(t) == new for t in out.tokens)
        assert drafter.calls == len(out.rounds), (new, drafter.calls, len(out.rounds))
        # One synchronisation a round, one more only in the rounds that may reach max_new_tokens (the
        # last always may; at most D + 1 = 4 rounds, as a round commits at least one token).
        assert 1 <= out.host_syncs - len(out.rounds) <= min(4, len(out.rounds)), (new, out.host_syncs, len(out.rounds))
    drafter = _CountingDrafter(s.drafter)
    out = decode.generate(s.target, drafter, s.prompts[4:4 + batch], method=method, max_new_tokens=MAX_NEW,
                          max_nodes=8, stop_token_ids=s.stops)
    assert out.tokens == s.refs_stop[4:4 + batch]
    assert len(out.rounds) <= drafter.calls <= len(out.rounds) + 1
    assert len(out.rounds) <= out.host_syncs <= 2 * len(out.rounds) + 1


def test_streaming_and_hf_model_input():
    """A bare transformers model is wrapped automatically; on_tokens streams exactly the output."""
    s = setup("qwen3")
    streamed = {0: [], 1: []}
    out = decode.generate(s.model, s.drafter, s.prompts[:2], method="ddtree", max_new_tokens=MAX_NEW, max_nodes=8,
                          on_tokens=lambda b, new: streamed[b].extend(new))
    assert out.tokens == s.refs[:2] == [streamed[0], streamed[1]]


def test_argument_errors():
    s = setup("qwen3")
    with pytest.raises(ValueError, match="unknown method"):
        decode.generate(s.target, s.drafter, [[5]], method="medusa")
    with pytest.raises(ValueError, match="needs a drafter"):
        decode.generate(s.target, None, [[5]], method="ddtree")
    with pytest.raises(ValueError, match="at least one token"):
        decode.generate(s.target, s.drafter, [[5], []])


def test_fast_runner_through_the_same_loop():
    """The fast runner (ddtree.fast_target) implements the same interface: same greedy output on CPU."""
    fast_target = pytest.importorskip("ddtree.fast_target")
    s = setup("llama")
    runner = fast_target.FastTarget.from_model(s.model)
    for method in ("ar", "ddtree"):
        got = []
        for prompts in _batches(s.prompts[:8], 4):
            got += decode.generate(runner, s.drafter, prompts, method=method, max_new_tokens=MAX_NEW, max_nodes=8,
                                   stop_token_ids=s.stops).tokens
        assert got == s.refs_stop[:8], method


# ---- GPU (bf16): item 6 -------------------------------------------------------------------------------
# Run on a CUDA machine (real checkpoints via DDTREE_TARGET / DDTREE_DRAFTER, else the tiny random pair):
#   DDTREE_TARGET=/ckpt/Qwen3-8B DDTREE_DRAFTER=/ckpt/Qwen3-8B-DFlash-b16 \
#     PYTHONPATH=python python3 -m pytest tests/test_decode.py -q -m gpu -k cuda_bf16


def _agree_up_to_near_tie(ours, ref, ref_logits, rel=4 * 2**-8):
    """True when ``ours`` equals ``ref``, or first differs at a step where the reference's logits for the two
    tokens are within bf16 precision (relative ``rel`` of the largest logit): a tie that rounding may break
    either way, after which the two continuations are no longer comparable."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            row = ref_logits[i].float()
            return bool((row[b] - row[a]).abs() <= rel * row.abs().max())
    return len(ours) == len(ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fast", [False, True])
def test_greedy_cuda_bf16(tmp_path, fast):
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddtree.drafter import DFlashDrafter
    from ddtree.target import as_target
    from models import save_pair

    tdir, ddir = os.environ.get("DDTREE_TARGET"), os.environ.get("DDTREE_DRAFTER")
    if not (tdir and ddir):
        tdir, ddir = save_pair(tmp_path, "qwen3", seed=51, block_size=8, hidden_size=256, num_heads=4,
                               num_kv_heads=2, head_dim=64)
    model = AutoModelForCausalLM.from_pretrained(tdir, dtype=torch.bfloat16).cuda().eval()
    runner = as_target(model, fast=fast)
    assert (type(runner).__name__ == "FastTarget") == fast
    drafter = DFlashDrafter.from_pretrained(ddir, device="cuda", dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(tdir)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 5, 8,",
             "Speculative decoding works by", "import torch\n", "The quick brown fox", "Q: What is 17 * 3?\nA:"]
    prompts = [tok(t).input_ids for t in texts]
    max_new = 40
    refs = []
    for p in prompts:
        g = model.generate(torch.tensor([p], device="cuda"), do_sample=False, max_new_tokens=max_new,
                           eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        refs.append((g.sequences[0, len(p):].tolist(), [lg[0] for lg in g.logits]))
    for method in decode.METHODS:
        for batch in _batches(list(range(len(prompts))), 4):
            out = decode.generate(runner, drafter, [prompts[i] for i in batch], method=method, max_new_tokens=max_new,
                                  max_nodes=32)
            for i, toks in zip(batch, out.tokens):
                assert _agree_up_to_near_tie(toks, *refs[i]), (method, texts[i], toks, refs[i][0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["dflash", "ddtree"])
def test_one_host_sync_per_round_cuda(method):
    """A round synchronises the host once (plus one end-of-round read in the rounds that may reach
    max_new_tokens, which generate counts in host_syncs). CUDA's sync debug mode warns on every
    synchronising operation; two runs that differ only in length may differ by at most the difference of
    their host_syncs (set-up syncs, the same in both, cancel). Fixed tree sizes, so no graph is captured
    while counting."""
    import warnings

    from ddtree import demo
    from ddtree.drafter import DFlashDrafter
    from ddtree.target import load_target

    tdir, ddir = demo.pretrained_pair()
    target = load_target(tdir, device="cuda", dtype=torch.bfloat16)
    assert type(target).__name__ == "FastTarget"
    drafter = DFlashDrafter.from_pretrained(ddir, device="cuda", dtype=torch.bfloat16)
    prompt = [[5 + i % 60 for i in range(40)]]

    def run(new):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = decode.generate(target, drafter, prompt, method=method, max_new_tokens=new, max_nodes=32)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return out.host_syncs, sum("synchroniz" in str(w.message).lower() for w in caught), len(out.rounds)

    run(96)  # warm-up at the largest cache: later runs keep its buffers and its captured graph
    h1, s1, r1 = run(24)
    h2, s2, r2 = run(96)
    # The loop's own count (a round's one read, plus the end-of-round reads near max_new_tokens) accounts
    # for every synchronisation CUDA saw beyond the set-up's.
    assert r2 > r1 and s2 - s1 <= h2 - h1, (h1, s1, r1, h2, s2, r2)
    assert h2 - r2 <= drafter.block_size and h1 - r1 <= drafter.block_size


# ---------------------------------------------------------------------------------------------------
# CaDDTree's batch budget modes


def _batch_cost(slope):
    """A cost model with batch curves at B = 1 and 4 (linear in n: per forward 1 ms + 0.2 ms per row +
    slope ms per slot), drafting 0.5 ms: steep enough that the budgets land strictly inside 0..8."""
    from ddtree.cost import CostModel

    grid = list(range(9))
    med = np.array([[[1.0 + 0.2 * B + slope * B * (n + 1) for n in grid]] for B in (1, 4)])
    return CostModel.fit(grid, [0], med, 0.5, batch_sizes=[1, 4])


def _live_sizes(out):
    """Per round: the tree sizes of the requests still generating (accept_len > 0)."""
    return [[n for n, a in zip(r.tree_size, r.accept_len) if a] for r in out.rounds]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("mode", ["batch", "ragged"])
@pytest.mark.parametrize("batch", [1, 4])
def test_batch_budget_modes_greedy_equals_transformers(arch, mode, batch):
    s = setup(arch)
    use_stops = batch == 4  # a ragged batch: prompts of different lengths, requests ending early
    refs = s.refs_stop if use_stops else s.refs
    got = []
    for prompts in _batches(s.prompts[:8], batch):
        out = decode.generate(s.target, s.drafter, prompts, method="caddtree", max_new_tokens=MAX_NEW, max_nodes=8,
                              cost_model=_batch_cost(0.03), budget_mode=mode,
                              stop_token_ids=s.stops if use_stops else ())
        got += out.tokens
        if mode == "batch":  # one node count for the live requests (each has more than 8 candidates)
            assert all(len(set(r)) <= 1 for r in _live_sizes(out)), _live_sizes(out)
    assert got == refs[:8]


def test_batch_mode_one_size_per_round_and_ragged_mode_not():
    s = setup("qwen3")
    prompts = s.prompts[:4]
    kw = dict(method="caddtree", max_new_tokens=MAX_NEW, max_nodes=8, cost_model=_batch_cost(0.03))
    batch = _live_sizes(decode.generate(s.target, s.drafter, prompts, budget_mode="batch", **kw))
    ragged = _live_sizes(decode.generate(s.target, s.drafter, prompts, budget_mode="ragged", **kw))
    assert all(len(set(r)) == 1 for r in batch)
    assert {n for r in batch for n in r} - {0, 8}, batch  # budgets strictly inside 0..8 occur
    assert any(len(set(r)) > 1 for r in ragged), ragged  # ragged mode gives each request its own share


@pytest.mark.parametrize("cost", ["profiled", "default"])
def test_modes_agree_at_batch_1(cost):
    """With one request the three modes price the same forward: identical rounds and tokens."""
    s = setup("llama")
    model = _batch_cost(0.1) if cost == "profiled" else None  # default: CostModel.default, no batch curves
    sizes = set()
    for prompt in s.prompts[:3]:
        runs = [decode.generate(s.target, s.drafter, [prompt], method="caddtree", max_new_tokens=MAX_NEW,
                                max_nodes=8, cost_model=model, budget_mode=mode)
                for mode in ("request", "batch", "ragged")]
        rounds = [[(r.tree_size, r.accept_len) for r in out.rounds] for out in runs]
        assert rounds[0] == rounds[1] == rounds[2]
        assert runs[0].tokens == runs[1].tokens == runs[2].tokens == [s.refs[s.prompts.index(prompt)]]
        sizes |= {n for r in runs[0].rounds for n in r.tree_size}
    if cost == "profiled":
        assert sizes - {0, 8}, sizes  # budgets strictly inside 0..8: the modes agree on a real decision


def test_budget_mode_errors():
    s = setup("qwen3")
    with pytest.raises(ValueError, match=r"unknown budget_mode 'padded'; choose from request, batch, ragged"):
        decode.generate(s.target, s.drafter, [[5]], method="caddtree", budget_mode="padded")
    for method in ("ar", "dflash", "ddtree"):
        with pytest.raises(ValueError, match=rf"budget_mode 'batch' needs method 'caddtree'.*got method '{method}'"):
            decode.generate(s.target, s.drafter, [[5]], method=method, budget_mode="batch")
