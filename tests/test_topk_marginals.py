"""topk_marginals against the reference: identical token ids, log-probs within fp32 rounding."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, strategies as st

import ddtree
import reference as ref
from conftest import devices
from inputs import LOGIT_KINDS, make_logits, seed_of

EPS32 = torch.finfo(torch.float32).eps
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def logprob_tolerance(logits: torch.Tensor, temperature: float, expected: torch.Tensor) -> torch.Tensor:
    """Per-entry bound on |kernel - reference| for log-probs, from fp32 rounding.

    log_softmax(v)_i = v_i - m - log(sum exp(v - m)) with an fp32 normaliser (ops.h): rounding v - m
    errs by eps/2 |v - m|, which moves log(sum) by at most eps/2 times the softmax mean of |v - m|
    (<= |v|max + log V); exp errs by a few ulp and the sum by a few eps relative; the final subtraction
    by eps times |v| + |result|. Each is at most a few eps times |v|max + |result| + log(V) + 1.
    """
    v = logits.float() / temperature
    finite = torch.where(torch.isfinite(v), v.abs(), torch.zeros_like(v))
    vmax = finite.amax(dim=-1, keepdim=True)
    magnitude = vmax + expected.abs().nan_to_num(posinf=0.0) + torch.log(torch.tensor(float(logits.shape[-1]))) + 1
    return 16 * EPS32 * magnitude


def assert_topk_matches(logits: torch.Tensor, k: int, temperature: float, device: str) -> None:
    got_lp, got_ids = ddtree.topk_marginals(logits.to(device), k, temperature)
    exp_lp, exp_ids = ref.topk_marginals(logits, k, temperature)
    assert got_lp.dtype == torch.float32 and got_ids.dtype == torch.int64
    assert got_lp.shape == got_ids.shape == (*logits.shape[:2], k)
    got_lp, got_ids = got_lp.cpu(), got_ids.cpu()
    assert torch.equal(got_ids, exp_ids), f"token ids differ at {(got_ids != exp_ids).nonzero()[:5].tolist()}"
    assert not got_lp.isnan().any()
    # -inf exactly where the reference has -inf; elsewhere within rounding.
    assert torch.equal(torch.isneginf(got_lp), torch.isneginf(exp_lp))
    fin = torch.isfinite(exp_lp)
    assert torch.isfinite(got_lp[fin]).all()
    err = (got_lp - exp_lp).abs()[fin]
    tol = logprob_tolerance(logits, temperature, exp_lp).expand_as(exp_lp)[fin]
    assert (err <= tol).all(), f"max error {float((err - tol).max())} over tolerance"


SHAPES = list(itertools.product((1, 3, 8), (1, 4, 15), (1, 4, 64)))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,K", SHAPES)
def test_matches_reference(B, D, K, dtype, kind, device):
    gen = torch.Generator().manual_seed(seed_of(B, D, K, dtype, kind))
    V = K + int(torch.randint(0, 200, (1,), generator=gen))
    logits = make_logits(B, D, V, dtype, kind, gen)
    assert_topk_matches(logits, K, 1.0, device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("V", (1, 5, 64))
def test_k_equals_vocab(V, kind, device):
    gen = torch.Generator().manual_seed(V)
    logits = make_logits(3, 4, V, torch.float32, kind, gen)
    assert_topk_matches(logits, V, 1.0, device)
    # With k == V the probabilities of a finite row sum to one.
    lp, _ = ddtree.topk_marginals(logits.to(device), V)
    total = lp.cpu().double().exp().sum(-1)
    ok_rows = ~torch.isneginf(ref.topk_marginals(logits, V)[0]).all(-1)
    assert torch.allclose(total[ok_rows], torch.ones_like(total[ok_rows]), atol=V * 4 * EPS32)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("temperature", (0.05, 0.7, 1.0, 3.3))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_temperature(temperature, dtype, device):
    gen = torch.Generator().manual_seed(7)
    logits = make_logits(4, 5, 300, dtype, "normal", gen)
    assert_topk_matches(logits, 17, temperature, device)


@pytest.mark.parametrize("device", devices())
def test_large_vocab(device):
    """A real vocabulary size (many blocks of work per row on any backend)."""
    gen = torch.Generator().manual_seed(3)
    logits = make_logits(2, 3, 151_936, torch.bfloat16, "normal", gen)
    assert_topk_matches(logits, 64, 1.0, device)


def test_special_rows_exact():
    """The contract's special rows, written out by hand."""
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[[1.0, inf, 0.0, inf],     # two +inf share the mass: -log 2 each
                            [-inf, nan, -inf, nan],  # nothing finite: all -inf, ids in order
                            [2.0, 2.0, nan, 2.0],    # ties by smaller id; NaN is -inf, last
                            [nan, 0.0, -inf, 5.0]]])
    lp, ids = ddtree.topk_marginals(logits, 4)
    log2 = torch.log(torch.tensor(2.0))
    assert ids.tolist() == [[[1, 3, 0, 2], [0, 1, 2, 3], [0, 1, 3, 2], [3, 1, 0, 2]]]
    assert torch.allclose(lp[0, 0, :2], -log2.repeat(2), rtol=2 * EPS32, atol=0)
    assert torch.isneginf(lp[0, 0, 2:]).all() and torch.isneginf(lp[0, 1]).all()
    assert torch.allclose(lp[0, 2, :3], -torch.log(torch.tensor(3.0)).repeat(3), rtol=4 * EPS32, atol=0)
    assert torch.isneginf(lp[0, 2, 3]) and torch.isneginf(lp[0, 3, 2:]).all()


@given(
    B=st.integers(1, 4), D=st.integers(1, 6), V=st.integers(1, 70), k_frac=st.floats(0, 1),
    kind=st.sampled_from(LOGIT_KINDS), dtype=st.sampled_from(DTYPES),
    temperature=st.sampled_from([0.3, 1.0, 2.0]), seed=st.integers(0, 2**31 - 1),
)
def test_random(B, D, V, k_frac, kind, dtype, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    k = 1 + int(k_frac * (V - 1))
    assert_topk_matches(make_logits(B, D, V, dtype, kind, gen), k, temperature, "cpu")


@pytest.mark.parametrize("order", ("random", "ascending", "descending"))
@pytest.mark.parametrize("kind", ("normal", "ties"))
@pytest.mark.parametrize("k", (1, 16, 1024))
def test_real_vocab_orders_and_ties(k, kind, order):
    """A real vocabulary with the selection's threshold in play: values tied at the k-th place (ties
    kind: five values, so thousands tie at the threshold), and sorted rows (the worst order for a
    running threshold, the best and worst for block maxima)."""
    gen = torch.Generator().manual_seed(seed_of(k, kind, order))
    logits = make_logits(1, 3, 151_936, torch.float32, kind, gen)
    if order != "random":
        logits = logits.sort(dim=-1, descending=(order == "descending")).values
    assert_topk_matches(logits, k, 1.0, "cpu")
    assert_topk_matches(logits, k, 0.7, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", (63, 64, 65, 1000, 4097))
def test_block_edges(V, dtype):
    """Vocabulary sizes around the 64-value blocks and the 16-value scan chunks, k from 1 to V, with
    non-finite entries and ties, one row per (k, kind) so that the rows also run in parallel."""
    gen = torch.Generator().manual_seed(seed_of(V, dtype))
    for k in sorted({1, 2, V // 64, V // 64 + 1, V // 2, V - 1, V} - {0}):
        for kind in LOGIT_KINDS:
            assert_topk_matches(make_logits(2, 5, V, dtype, kind, gen), k, 1.0, "cpu")


def test_non_contiguous_input():
    gen = torch.Generator().manual_seed(12)
    logits = make_logits(3, 4, 3000, torch.float32, "normal", gen)
    strided = logits.transpose(0, 1)  # [4, 3, V], not contiguous
    assert not strided.is_contiguous()
    assert_topk_matches(strided, 40, 1.3, "cpu")
