"""The ``ddtree_tree`` attention function: a stock transformers Qwen3/Llama verifies a draft tree
through our kernel and our static cache, and gets the same logits as the same model run with SDPA on
the whole sequence and a dense 4D tree mask."""
from __future__ import annotations

import pytest
import torch

import ddtree
from ddtree import hf_attention
from ddtree.target import HFTarget

from models import tiny_target

TOL = dict(atol=2e-5, rtol=2e-5)  # fp32: only summation order differs


def _random_tree(B, ctx, V, max_nodes=10, D=3, K=3, seed=0):
    """A tree per request from random marginals; per-row cost slopes make the sizes ragged (unused slots)."""
    g = torch.Generator().manual_seed(seed)
    logprobs, ids = ddtree.topk_marginals(torch.randn(B, D, V, generator=g) * 2, K)
    roots = torch.randint(V, (B,), generator=g)
    n = torch.arange(max_nodes + 1, dtype=torch.float32)
    slopes = torch.tensor([0.0, 0.2, 1.0, 0.05])[:B]
    cost = (1.0 + slopes[:, None] * n).contiguous()
    return ddtree.build_tree(logprobs, ids, roots, ctx, max_nodes, cost, 0.1)


def _dense_reference(model, prompt, tree, b):
    """Logits and hidden states of row b's tree slots: SDPA over [prompt ; all tree slots] with a dense mask."""
    L, T = len(prompt), tree.num_slots
    ids = torch.tensor([list(prompt) + tree.tokens[b].tolist()])
    pos = torch.cat([torch.arange(L), tree.positions[b]])[None]
    mask = torch.zeros(L + T, L + T, dtype=torch.bool)
    mask[:L, :L] = torch.ones(L, L).tril().bool()
    mask[L:, :L] = True
    mask[L:, L:] = tree.dense_mask()[b]
    mask[L:, L:] |= torch.eye(T, dtype=torch.bool)  # unused slots see themselves (rows stay finite; not compared)
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask[None, None], output_hidden_states=True)
    return out.logits[0, L:], [h[0, L:] for h in out.hidden_states]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_verify_matches_sdpa_dense_mask(arch):
    model = tiny_target(arch, seed=3)
    V = model.config.vocab_size
    prompts = [[3, 9, 4, 7, 1], [8, 2, 6, 6, 5, 4, 3, 2, 9], [5, 5], [7]]
    B = len(prompts)
    runner = HFTarget(model)
    runner.set_feature_layers([0, 1])
    runner.reset(B, 32)
    ids = torch.zeros(B, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    logits0, feats0 = runner.prefill(ids, lengths)
    tree = _random_tree(B, runner.context_lens, V)
    assert len(set(tree.num_nodes.tolist())) > 1, "want ragged tree sizes"
    logits, feats = runner.verify(tree)
    assert logits.shape == (B, tree.num_slots, V) and logits.dtype == torch.float32
    assert feats.shape == (B, tree.num_slots, 2 * model.config.hidden_size)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            n = int(tree.num_nodes[b]) + 1
            ref_logits, ref_hidden = _dense_reference(model, p, tree, b)
            torch.testing.assert_close(logits[b, :n], ref_logits[:n], **TOL)
            # Features are the raw decoder-layer outputs: layer 0 is hidden_states[1]; the last layer's
            # output, after the final norm, is what transformers reports as the last hidden state.
            H = model.config.hidden_size
            torch.testing.assert_close(feats[b, :n, :H], ref_hidden[1][:n], **TOL)
            torch.testing.assert_close(model.model.norm(feats[b, :n, H:]), ref_hidden[2][:n], **TOL)
            # Prefill: the last prompt token's logits, and every prompt position's features.
            full = model(input_ids=torch.tensor([p]), output_hidden_states=True)
            torch.testing.assert_close(logits0[b], full.logits[0, -1], **TOL)
            torch.testing.assert_close(feats0[b, : len(p), :H], full.hidden_states[1][0], **TOL)
    # The verify wrote every slot at context_len + slot and left context_lens alone.
    assert torch.equal(runner.context_lens, lengths)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_commit_compacts_to_sequential_cache(arch):
    """After verify + accept + commit, the cache equals a fresh prefill of prompt + accepted path."""
    model = tiny_target(arch, seed=4)
    V = model.config.vocab_size
    prompts = [[3, 9, 4, 7, 1, 2], [8, 2, 6], [5, 5, 5, 1, 1, 1, 2, 2, 3]]
    B = len(prompts)
    runner = HFTarget(model)
    runner.set_feature_layers([])
    runner.reset(B, 40)
    ids = torch.zeros(B, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    runner.prefill(ids, torch.tensor([len(p) for p in prompts]))
    tree = _random_tree(B, runner.context_lens, V, max_nodes=12, seed=5)
    runner.verify(tree)
    # Force the walk to the deepest node of each tree (row 2: root only) by choosing target tokens.
    target_tokens = torch.zeros(B, tree.num_slots, dtype=torch.long)
    paths = []
    for b in range(B):
        n = int(tree.num_nodes[b])
        slot = max(range(n + 1), key=lambda s: int(tree.depths[b, s])) if b < 2 else 0
        path = [slot]
        while path[-1] != 0:
            path.append(int(tree.parents[b, path[-1]]))
        path.reverse()
        for parent, child in zip(path, path[1:]):
            target_tokens[b, parent] = tree.tokens[b, child]
        target_tokens[b, path[-1]] = V - 1  # the bonus: any token, as long as no child carries it
        if any(int(tree.tokens[b, j]) == V - 1 and int(tree.parents[b, j]) == path[-1] for j in range(n + 1)):
            target_tokens[b, path[-1]] = V - 2
        paths.append(path)
    accepted, accept_len, _ = ddtree.accept_tree(tree.tokens, tree.parents, tree.num_nodes, target_tokens, 3)
    assert accept_len.tolist() == [len(p) for p in paths]
    assert max(accept_len.tolist()) >= 3, "want a path with several accepted nodes"
    ctx0 = runner.context_lens.clone()
    runner.commit(accepted, accept_len)
    assert torch.equal(runner.context_lens, ctx0 + accept_len)

    fresh = HFTarget(model)
    fresh.set_feature_layers([])
    seqs = [p + [int(tree.tokens[b, s]) for s in path] for b, (p, path) in enumerate(zip(prompts, paths))]
    fresh.reset(B, 40)
    ids = torch.zeros(B, max(map(len, seqs)), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
    fresh.prefill(ids, torch.tensor([len(s) for s in seqs]))
    for b, s in enumerate(seqs):
        for mine, ref in zip(runner.k_cache + runner.v_cache, fresh.k_cache + fresh.v_cache):
            torch.testing.assert_close(mine[b, :, : len(s)], ref[b, :, : len(s)], **TOL)


def test_fallback_without_state_is_sdpa():
    """A model switched to ddtree_tree still runs ordinary forwards (SDPA) when no tree state is passed."""
    model = tiny_target("qwen3", seed=6)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with hf_attention.use_tree_attention(model):
            assert model.config._attn_implementation == "ddtree_tree"
            got = model(input_ids=ids).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, ref, **TOL)
