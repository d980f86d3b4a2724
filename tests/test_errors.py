"""Every bad input raises a RuntimeError whose message starts with the op and names the argument.

Shape/dtype/device checks are the shared ones of csrc/validate.cpp; the value checks (context lengths
against the cache, slot indices against the tree, num_nodes, accept_len) are the CPU kernels'. The
device checks use the 'meta' device for the second tensor, since this machine has no GPU (and a GPU
variant runs where there is one).
"""
from __future__ import annotations

import re

import pytest
import torch

import ddtree
from conftest import gpu

L, I32, F32 = torch.int64, torch.int32, torch.float32


def raises(op: str, arg: str, subject: bool = True):
    """pytest.raises for a RuntimeError from ``op`` naming ``arg``: as the subject of the message
    (right after "op: ") by default, anywhere in it otherwise."""
    name = re.escape(arg) + r"(?!\w)"
    pattern = rf"{op}: {name}" if subject else rf"{op}: .*(?<!\w){name}"
    return pytest.raises(RuntimeError, match=pattern)


# --------------------------------------------------------------------------------------------------
# topk_marginals

LOGITS = torch.randn(2, 3, 10)


def test_topk_logits_dtype():
    with raises("topk_marginals", "logits"):
        ddtree.topk_marginals(LOGITS.double(), 2)
    with raises("topk_marginals", "logits"):
        ddtree.topk_marginals(LOGITS.long(), 2)


def test_topk_logits_rank():
    with raises("topk_marginals", "logits"):
        ddtree.topk_marginals(LOGITS[0], 2)


def test_topk_k_above_vocab():
    with raises("topk_marginals", "k"):
        ddtree.topk_marginals(LOGITS, 11)


def test_topk_k_below_one():
    with raises("topk_marginals", "k"):
        ddtree.topk_marginals(LOGITS, 0)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_topk_temperature(temperature):
    with raises("topk_marginals", "temperature"):
        ddtree.topk_marginals(LOGITS, 2, temperature)


# --------------------------------------------------------------------------------------------------
# build_tree


def tree_args(B=2, D=3, K=4, max_nodes=5, cost=False):
    lp, ids = ddtree.topk_marginals(torch.randn(B, D, 20), K)
    verify = torch.ones(B, max_nodes + 1) if cost else None
    return dict(logprobs=lp, token_ids=ids, root_tokens=torch.zeros(B, dtype=L), context_lens=torch.zeros(B, dtype=L),
                max_nodes=max_nodes, verify_cost=verify, draft_cost=0.1)


def call_tree(**overrides):
    args = tree_args(cost=overrides.pop("cost", False))
    args.update(overrides)
    return ddtree.build_tree(*args.values())


def test_tree_logprobs_dtype():
    with raises("build_tree", "logprobs"):
        call_tree(logprobs=tree_args()["logprobs"].double())


def test_tree_logprobs_rank():
    with raises("build_tree", "logprobs"):
        call_tree(logprobs=tree_args()["logprobs"][0])


def test_tree_token_ids_dtype():
    with raises("build_tree", "token_ids"):
        call_tree(token_ids=tree_args()["token_ids"].int())


def test_tree_token_ids_shape():
    with raises("build_tree", "token_ids"):
        call_tree(token_ids=tree_args()["token_ids"][:, :2])


def test_tree_root_tokens_batch():
    with raises("build_tree", "root_tokens"):
        call_tree(root_tokens=torch.zeros(3, dtype=L))


def test_tree_context_lens_batch():
    with raises("build_tree", "context_lens"):
        call_tree(context_lens=torch.zeros(1, dtype=L))


def test_tree_context_lens_dtype():
    with raises("build_tree", "context_lens"):
        call_tree(context_lens=torch.zeros(2, dtype=I32))


def test_tree_context_lens_negative():
    with raises("build_tree", "context_lens"):
        call_tree(context_lens=torch.tensor([0, -1]))


def test_tree_max_nodes_negative():
    with raises("build_tree", "max_nodes"):
        call_tree(max_nodes=-1)


@pytest.mark.parametrize("max_nodes", [10**6, 10**9, 2**31 - 2])
def test_tree_max_nodes_beyond_memory(max_nodes):
    """Outputs that no machine here can hold (the ancestor mask grows with max_nodes squared: 10**6 nodes
    need 125 GB a request) are refused before anything is allocated, not left to the OOM killer."""
    with raises("build_tree", "max_nodes"):
        call_tree(max_nodes=max_nodes, logprobs=torch.zeros(64, 3, 4),
                  token_ids=torch.zeros(64, 3, 4, dtype=L), root_tokens=torch.zeros(64, dtype=L),
                  context_lens=torch.zeros(64, dtype=L))


@pytest.mark.parametrize("max_nodes", [2**31 - 1, 2**62, 2**63 - 1])
def test_tree_max_nodes_beyond_int32(max_nodes):
    with raises("build_tree", "max_nodes"):
        call_tree(max_nodes=max_nodes)


def test_tree_cost_table_too_short():
    with raises("build_tree", "verify_cost"):
        call_tree(verify_cost=torch.ones(2, 5))  # max_nodes = 5 needs 6 columns


def test_tree_cost_table_batch():
    with raises("build_tree", "verify_cost"):
        call_tree(verify_cost=torch.ones(3, 6))


def test_tree_cost_table_dtype():
    with raises("build_tree", "verify_cost"):
        call_tree(verify_cost=torch.ones(2, 6, dtype=torch.float64))


def test_tree_cost_not_positive():
    """theta divides by draft_cost + verify_cost: a zero (or negative) total is rejected."""
    with raises("build_tree", "draft_cost + verify_cost", subject=False):
        call_tree(verify_cost=torch.zeros(2, 6), draft_cost=0.0)


@pytest.mark.parametrize("draft_cost", [-0.5, float("nan"), float("inf")])
def test_tree_draft_cost(draft_cost):
    with raises("build_tree", "draft_cost"):
        call_tree(cost=True, draft_cost=draft_cost)


def test_tree_device_mismatch():
    with raises("build_tree", "token_ids"):
        call_tree(token_ids=tree_args()["token_ids"].to("meta"))
    with raises("build_tree", "verify_cost"):
        call_tree(verify_cost=torch.ones(2, 6, device="meta"))


# --------------------------------------------------------------------------------------------------
# tree_attention


def attn_args(B=2, Hq=4, Hkv=2, T=3, d=8, S=10):
    mask = torch.tensor([1, 3, 5], dtype=I32).repeat(B, 1).reshape(B, T, 1)
    return dict(q=torch.randn(B, Hq, T, d), k_cache=torch.randn(B, Hkv, S, d), v_cache=torch.randn(B, Hkv, S, d),
                context_lens=torch.tensor([0, 7])[:B], tree_mask=mask, num_nodes=torch.full((B,), 2, dtype=I32),
                scale=0.3)


def call_attn(**overrides):
    args = attn_args()
    args.update(overrides)
    return ddtree.tree_attention(*args.values())


def test_attn_q_dtype():
    with raises("tree_attention", "q"):
        call_attn(q=attn_args()["q"].double())


def test_attn_kv_dtype():
    with raises("tree_attention", "k_cache"):
        call_attn(k_cache=attn_args()["k_cache"].half())
    with raises("tree_attention", "v_cache"):
        call_attn(v_cache=attn_args()["v_cache"].bfloat16())


def test_attn_q_rank():
    with raises("tree_attention", "q"):
        call_attn(q=attn_args()["q"][0])


def test_attn_cache_rank():
    with raises("tree_attention", "k_cache"):
        call_attn(k_cache=attn_args()["k_cache"][0])


def test_attn_batch_mismatch():
    with raises("tree_attention", "k_cache"):
        call_attn(k_cache=torch.randn(3, 2, 10, 8), v_cache=torch.randn(3, 2, 10, 8))
    with raises("tree_attention", "context_lens"):
        call_attn(context_lens=torch.zeros(3, dtype=L))
    with raises("tree_attention", "num_nodes"):
        call_attn(num_nodes=torch.zeros(1, dtype=I32))
    with raises("tree_attention", "tree_mask"):
        call_attn(tree_mask=attn_args()["tree_mask"][:1])


def test_attn_head_dim_mismatch():
    with raises("tree_attention", "k_cache"):
        call_attn(k_cache=torch.randn(2, 2, 10, 16), v_cache=torch.randn(2, 2, 10, 16))


def test_attn_v_shape():
    with raises("tree_attention", "v_cache"):
        call_attn(v_cache=torch.randn(2, 2, 11, 8))


def test_attn_gqa_not_multiple():
    with raises("tree_attention", "q.size(1)", subject=False):
        call_attn(q=torch.randn(2, 3, 3, 8))


def test_attn_cache_shorter_than_tree():
    with raises("tree_attention", "k_cache"):
        call_attn(k_cache=torch.randn(2, 2, 2, 8), v_cache=torch.randn(2, 2, 2, 8))


def test_attn_mask_dtype_and_width():
    with raises("tree_attention", "tree_mask"):
        call_attn(tree_mask=attn_args()["tree_mask"].long())
    with raises("tree_attention", "tree_mask"):
        call_attn(tree_mask=torch.zeros(2, 3, 2, dtype=I32))
    with raises("tree_attention", "tree_mask"):
        call_attn(tree_mask=torch.zeros(2, 4, 1, dtype=I32))


def test_attn_num_nodes_dtype():
    with raises("tree_attention", "num_nodes"):
        call_attn(num_nodes=torch.full((2,), 2, dtype=L))


@pytest.mark.parametrize("bad", [3, -1])
def test_attn_num_nodes_out_of_range(bad):
    with raises("tree_attention", "num_nodes"):
        call_attn(num_nodes=torch.tensor([2, bad], dtype=I32))  # T = 3 slots: num_nodes <= 2


def test_attn_context_does_not_fit():
    with raises("tree_attention", "context_lens"):
        call_attn(context_lens=torch.tensor([0, 8]))  # 8 + 3 slots > 10 positions


def test_attn_context_negative():
    with raises("tree_attention", "context_lens"):
        call_attn(context_lens=torch.tensor([-1, 0]))


@pytest.mark.parametrize("scale", [float("inf"), float("nan")])
def test_attn_scale(scale):
    with raises("tree_attention", "scale"):
        call_attn(scale=scale)


def test_attn_device_mismatch():
    with raises("tree_attention", "k_cache"):
        call_attn(k_cache=attn_args()["k_cache"].to("meta"))
    with raises("tree_attention", "num_nodes"):
        call_attn(num_nodes=attn_args()["num_nodes"].to("meta"))


# --------------------------------------------------------------------------------------------------
# accept_tree


def accept_args(B=2, T=5):
    parents = torch.tensor([-1, 0, 0, 1, 2], dtype=I32).repeat(B, 1)
    return dict(tokens=torch.arange(T).repeat(B, 1), parents=parents, num_nodes=torch.full((B,), 4, dtype=I32),
                target_tokens=torch.zeros(B, T, dtype=L))


def call_accept(**overrides):
    args = accept_args()
    args.update(overrides)
    return ddtree.accept_tree(*args.values())


def test_accept_dtypes():
    with raises("accept_tree", "tokens"):
        call_accept(tokens=accept_args()["tokens"].int())
    with raises("accept_tree", "parents"):
        call_accept(parents=accept_args()["parents"].long())
    with raises("accept_tree", "num_nodes"):
        call_accept(num_nodes=accept_args()["num_nodes"].long())
    with raises("accept_tree", "target_tokens"):
        call_accept(target_tokens=accept_args()["target_tokens"].int())


def test_accept_ranks_and_shapes():
    with raises("accept_tree", "tokens"):
        call_accept(tokens=accept_args()["tokens"][0])
    with raises("accept_tree", "parents"):
        call_accept(parents=accept_args()["parents"][:, :4])
    with raises("accept_tree", "target_tokens"):
        call_accept(target_tokens=torch.zeros(2, 6, dtype=L))
    with raises("accept_tree", "num_nodes"):
        call_accept(num_nodes=torch.full((3,), 4, dtype=I32))


@pytest.mark.parametrize("bad", [5, -1])
def test_accept_num_nodes_out_of_range(bad):
    with raises("accept_tree", "num_nodes"):
        call_accept(num_nodes=torch.tensor([4, bad], dtype=I32))  # 5 slots: num_nodes <= 4


@pytest.mark.parametrize("bad_parent", [3, 7, -1, -5])
def test_accept_parents_out_of_range(bad_parent):
    parents = accept_args()["parents"]
    parents[1, 3] = bad_parent  # slot 3's parent must be in [0, 2]
    with raises("accept_tree", "parents"):
        call_accept(parents=parents)


def test_accept_device_mismatch():
    with raises("accept_tree", "parents"):
        call_accept(parents=accept_args()["parents"].to("meta"))
    with raises("accept_tree", "target_tokens"):
        call_accept(target_tokens=accept_args()["target_tokens"].to("meta"))


# --------------------------------------------------------------------------------------------------
# compact_kv


def compact_args(B=2, S=10):
    return dict(caches=[torch.randn(B, 2, S, 4), torch.randn(B, 1, S, 8).half()],
                context_lens=torch.tensor([0, 5])[:B], accepted_slots=torch.tensor([[0, 2, -1], [0, 1, 4]])[:B],
                accept_len=torch.tensor([2, 3], dtype=I32)[:B])


def call_compact(**overrides):
    args = compact_args()
    args.update(overrides)
    return ddtree.compact_kv(*args.values())


def test_compact_accepted_slots_dtype_and_rank():
    with raises("compact_kv", "accepted_slots"):
        call_compact(accepted_slots=compact_args()["accepted_slots"].int())
    with raises("compact_kv", "accepted_slots"):
        call_compact(accepted_slots=compact_args()["accepted_slots"][0])


def test_compact_context_lens_and_accept_len():
    with raises("compact_kv", "context_lens"):
        call_compact(context_lens=torch.tensor([0, 5], dtype=I32))
    with raises("compact_kv", "context_lens"):
        call_compact(context_lens=torch.tensor([0, 5, 1]))
    with raises("compact_kv", "accept_len"):
        call_compact(accept_len=torch.tensor([2, 3]))
    with raises("compact_kv", "accept_len"):
        call_compact(accept_len=torch.tensor([2], dtype=I32))


def test_compact_cache_shapes():
    with raises("compact_kv", "caches[1]"):
        call_compact(caches=[torch.randn(2, 2, 10, 4), torch.randn(2, 10, 8)])
    with raises("compact_kv", "caches[0]"):
        call_compact(caches=[torch.randn(3, 2, 10, 4)])
    with raises("compact_kv", "caches[0]"):
        call_compact(caches=[torch.randn(2, 2, 4, 10).transpose(2, 3)])  # last dim not contiguous


@pytest.mark.parametrize("bad", [4, -1])
def test_compact_accept_len_out_of_range(bad):
    with raises("compact_kv", "accept_len"):
        call_compact(accept_len=torch.tensor([2, bad], dtype=I32))  # 3 columns


@pytest.mark.parametrize("bad_slot", [-1, 5])
def test_compact_accepted_slots_out_of_range(bad_slot):
    slots = compact_args()["accepted_slots"]
    slots[1, 2] = bad_slot  # context 5 + slot 5 = position 10, past the 10 positions
    with raises("compact_kv", "accepted_slots", subject=False):
        call_compact(accepted_slots=slots)


def test_compact_context_does_not_fit():
    with raises("compact_kv", "context_lens"):
        call_compact(context_lens=torch.tensor([0, 8]))  # 8 + accept_len 3 > 10 positions
    with raises("compact_kv", "context_lens"):
        call_compact(context_lens=torch.tensor([-1, 0]))


def test_compact_device_mismatch():
    with raises("compact_kv", "accept_len"):
        call_compact(accept_len=compact_args()["accept_len"].to("meta"))
    with raises("compact_kv", "caches[1]"):
        call_compact(caches=[torch.randn(2, 2, 10, 4), torch.randn(2, 1, 10, 8, device="meta")])


# --------------------------------------------------------------------------------------------------
# A real second device: the shared device checks of the CUDA path.


@gpu
@pytest.mark.gpu
def test_device_mismatch_cuda():
    with raises("build_tree", "token_ids"):
        call_tree(**{k: v.cuda() for k, v in tree_args().items() if isinstance(v, torch.Tensor) and k != "token_ids"})
    with raises("tree_attention", "k_cache"):
        call_attn(**{k: v.cuda() for k, v in attn_args().items() if isinstance(v, torch.Tensor) and k != "k_cache"})
    with raises("accept_tree", "parents"):
        call_accept(**{k: v.cuda() for k, v in accept_args().items() if k != "parents"})
    with raises("compact_kv", "context_lens"):
        call_compact(caches=[c.cuda() for c in compact_args()["caches"]], accepted_slots=compact_args()["accepted_slots"].cuda(),
                     accept_len=compact_args()["accept_len"].cuda())
