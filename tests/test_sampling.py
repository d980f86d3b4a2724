"""Sampling is exactly lossless: on a tiny vocabulary, the empirical distribution of the first three
generated tokens over 20000 independent rows matches the target's exact distribution (enumerated from
its conditionals, processed with transformers' own temperature / top-k / top-p warpers), for DDTree and
CaDDTree. A chi-square test at a fixed significance decides; the same counts must reject a slightly
different distribution, so the test has power."""
from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from ddtree import decode
from ddtree.target import HFTarget

from models import tiny_drafter, tiny_target

V = 8
PROMPT = [3, 5, 4]
SAMPLES = 20000
ALPHA = 1e-3


def exact_distribution(model, temperature, top_k, top_p) -> torch.Tensor:
    """P(t1, t2, t3 | PROMPT) as a flat ``[V**3]`` f64 tensor, by enumerating every prefix."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))

    def conditional(prefixes):  # [N, L] -> [N, V] probabilities of the next token
        ids = torch.tensor([PROMPT + list(p) for p in prefixes])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1].double()
        return warpers(ids, logits).softmax(-1)

    p1 = conditional([()])[0]
    p2 = conditional([(a,) for a in range(V)])  # [V, V]
    p3 = conditional(list(itertools.product(range(V), repeat=2))).view(V, V, V)
    return (p1[:, None, None] * p2[:, :, None] * p3).flatten()


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expected below 5 are pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue)


@pytest.fixture(scope="module")
def pair():
    model = tiny_target("qwen3", seed=31, vocab_size=V, init_std=0.08)
    drafter = tiny_drafter(model.config, block_size=4, seed=32, mask_token_id=2)
    return model, HFTarget(model), drafter


@pytest.mark.parametrize("method", ["ddtree", "caddtree"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 0.9)])
def test_first_three_tokens_follow_target_distribution(pair, method, temperature, top_k, top_p):
    model, target, drafter = pair
    probs = exact_distribution(model, temperature, top_k, top_p)
    counts = torch.zeros(V**3, dtype=torch.long)
    accept = []
    chunk = SAMPLES // 2
    for seed in range(2):  # two big batches of the same prompt, every row with its own randomness
        out = decode.generate(target, drafter, [PROMPT] * chunk, method=method, max_new_tokens=3,
                              temperature=temperature, top_k=top_k, top_p=top_p, max_nodes=6, seed=seed)
        toks = torch.tensor(out.tokens)
        assert toks.shape == (chunk, 3)
        counts += torch.bincount(toks[:, 0] * V * V + toks[:, 1] * V + toks[:, 2], minlength=V**3)
        accept.append(out.acceptance_length)
    assert min(accept) > 1.2, "draft tokens should be accepted often enough to exercise the tree paths"
    assert counts[probs == 0].sum() == 0, "sampled a token that top-k/top-p exclude"
    assert chi2_pvalue(counts, probs) > ALPHA
    # Power: the same counts reject the distribution at a 15% different temperature.
    assert chi2_pvalue(counts, exact_distribution(model, temperature * 1.15, top_k, top_p)) < ALPHA


def test_sample_tokens_processing_matches_transformers():
    """decode.sample_tokens keeps exactly the tokens transformers' warpers keep, and greedy is argmax."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=g) * 3
    kept = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(6)(None, logits / 0.9)) > float("-inf")
    draws = torch.stack([decode.sample_tokens(logits, 0.9, 6, 0.8, g) for _ in range(300)])  # [300, 64]
    seen = torch.zeros_like(kept).scatter_(1, draws.T, True)
    assert torch.equal(seen, kept)
    assert torch.equal(decode.sample_tokens(logits, 0.0), logits.argmax(-1))
