"""The fast target runner against transformers' own Qwen3/Llama models (random weights, CPU).

Each test saves a tiny random Hugging Face model with ``save_pretrained`` (safetensors), loads it with
``FastTarget.from_pretrained`` and compares: prefill logits and features against ``output_hidden_states``;
a tree verify against HF run with a dense 4D ancestor mask over its DynamicCache (sdpa, position_ids =
tree positions); verify after ``commit`` against HF on the committed sequence; ragged batches; bucket
padding against the exact size. Tolerances: fp32 tight (rounding of a few layers), bf16 a few ulps of
the logit scale.
"""
from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ddtree  # noqa: E402
from ddtree.fast_target import FastTarget, rope_inv_freq  # noqa: E402

# Tolerance on logits relative to the largest |logit| of the reference. fp32: observed <= 1.1e-6 (a few
# ulps through 3 layers). bf16: ~10 ulps (2^-8 each) of the scale, observed <= 2.3e-2: HF and we round
# intermediates (attention probabilities, fused vs split projections) at different points.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2}

CONFIGS = {
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True),
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    # Llama with biases and Llama-3 RoPE scaling: the optional paths of the loader and the math
    "llama3-bias": dict(model_type="llama", tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=64), rope_theta=500.0),
}


def make_hf(kind: str, tmp_path, layers: int = 3, seed: int = 0, head_dim: int = 16):
    """A tiny random HF causal LM saved as safetensors under tmp_path; returns (hf model fp32, dir)."""
    kw = dict(CONFIGS[kind])
    model_type = kw.pop("model_type")
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256,
                  initializer_range=0.15, rms_norm_eps=1e-6, attn_implementation="sdpa")
    cls = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[model_type]
    config = cls[0](**common, **kw)
    torch.manual_seed(seed)
    model = cls[1](config).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so a wrong load shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    path = tmp_path / kind
    model.save_pretrained(path, safe_serialization=True)
    return model, str(path)


def close(a, b, dtype):
    scale = b.abs().max().item()
    err = (a.float() - b.float()).abs().max().item()
    assert err <= RTOL[dtype] * scale + 1e-6, f"max abs err {err:.3g} vs logit scale {scale:.3g}"


def cache_name(model) -> str:
    """The KV cache's argument and output name: transformers 5.24 renamed past_key_values to cache (the
    old name warns; its removal is announced for 5.40), earlier releases know only past_key_values."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_prefill(model, ids, dtype):
    """HF forward over ids [1, L] -> (logits [1, L, V] f32, hidden_states tuple, DynamicCache)."""
    out = model.to(dtype)(ids, use_cache=True, output_hidden_states=True)
    return out.logits.float(), out.hidden_states, out[cache_name(model)]


def hf_tree(model, cache, tree: ddtree.DraftTree, b: int, ctx: int):
    """HF verify of request b's tree over its cache of ctx tokens: dense 4D bool mask [1,1,T,ctx+T]."""
    T = tree.num_slots
    anc = tree.dense_mask()[b]  # [T, T] bool
    n = int(tree.num_nodes[b])
    anc[n + 1:, :] = False  # rows past num_nodes see no tree key in the kernel either...
    anc[torch.arange(T), torch.arange(T)] = True  # ...but keep SDPA rows non-empty (they are not compared)
    mask = torch.cat([torch.ones(T, ctx, dtype=torch.bool), anc], dim=1)[None, None]
    out = model(tree.tokens[b:b + 1], position_ids=tree.positions[b:b + 1], attention_mask=mask,
                use_cache=True, **{cache_name(model): cache})
    return out.logits.float()[0]  # [T, V]


def random_tree(ctx: torch.Tensor, roots: torch.Tensor, vocab: int, depth: int = 5, k: int = 3,
                max_nodes: int = 12, seed: int = 0) -> ddtree.DraftTree:
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(ctx.shape[0], depth, vocab, generator=g)
    lp, ids = ddtree.topk_marginals(logits, k)
    return ddtree.build_tree(lp, ids, roots, ctx, max_nodes)


def deepest_path_targets(tree: ddtree.DraftTree) -> torch.Tensor:
    """target_tokens [B, T] under which accept_tree accepts the path to each request's deepest node."""
    B, T = tree.tokens.shape
    target = torch.full((B, T), 7, dtype=torch.int64)  # 7: the bonus token at the deepest node
    for b in range(B):
        n = int(tree.num_nodes[b])
        c = max(range(n + 1), key=lambda j: int(tree.depths[b, j]))
        while c > 0:
            p = int(tree.parents[b, c])
            target[b, p] = tree.tokens[b, c]
            c = p
    return target


FEATURE_LAYERS = [0, 1]  # not the last layer: HF's last hidden state is taken after the final norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_prefill_matches_hf(kind, dtype, tmp_path):
    model, path = make_hf(kind, tmp_path)
    fast = FastTarget.from_pretrained(path, device="cpu", dtype=dtype)
    fast.set_feature_layers(FEATURE_LAYERS)
    fast.reset(1, 64)
    ids = torch.randint(0, 320, (1, 11), generator=torch.Generator().manual_seed(1))
    logits, feats = fast.prefill(ids, torch.tensor([11]))
    ref_logits, hs, _ = hf_prefill(model, ids, dtype)
    close(logits, ref_logits[:, -1], dtype)
    assert feats.shape == (1, 11, 64 * len(FEATURE_LAYERS)) and feats.dtype == dtype
    ref_feats = torch.cat([hs[i + 1] for i in FEATURE_LAYERS], dim=-1)
    close(feats, ref_feats, dtype)
    assert fast.context_lens.tolist() == [11]
    # the interface pieces the drafter uses
    assert torch.equal(fast.embed(ids), model.get_input_embeddings()(ids))
    h = torch.randn(2, 64, dtype=dtype)
    assert torch.allclose(fast.lm_head(h), model.lm_head(h).float())


def test_rope_llama3_matches_transformers(tmp_path):
    model, _ = make_hf("llama3-bias", tmp_path)
    ours = rope_inv_freq(model.config, 16)
    assert torch.equal(ours, model.model.rotary_emb.inv_freq.cpu())


def test_unsupported_configs_are_refused(tmp_path):
    q = transformers.Qwen3Config(vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    assert FastTarget.supports(q)
    assert not FastTarget.supports(transformers.GPT2Config())
    yarn = transformers.LlamaConfig(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024),
                                    max_position_embeddings=4096)
    assert not FastTarget.supports(yarn)
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        FastTarget(yarn, {}, "cpu", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_verify_commit_verify_matches_hf(kind, dtype, tmp_path):
    model, path = make_hf(kind, tmp_path)
    model = model.to(dtype)
    fast = FastTarget.from_pretrained(path, device="cpu", dtype=dtype)
    fast.set_feature_layers(FEATURE_LAYERS)
    fast.reset(1, 96)
    prompt = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(2))
    fast.prefill(prompt, torch.tensor([9]))
    _, _, cache = hf_prefill(model, prompt, dtype)

    tree = random_tree(torch.tensor([9]), torch.tensor([5]), 320, seed=3)
    logits, feats = fast.verify(tree)
    T, n = tree.num_slots, int(tree.num_nodes[0])
    assert logits.shape == (1, T, 320) and logits.dtype == torch.float32 and feats.shape == (1, T, 128)
    ref = hf_tree(model, cache, tree, 0, 9)
    close(logits[0, :n + 1], ref[:n + 1], dtype)
    assert fast.context_lens.tolist() == [9]  # verify leaves the committed length alone

    # accept the deepest path, commit, and verify a second tree on top of it
    acc, alen, bonus = ddtree.accept_tree(tree.tokens, tree.parents, tree.num_nodes, deepest_path_targets(tree), 5)
    a = int(alen[0])
    assert a >= 2
    fast.commit(acc, alen)
    assert fast.context_lens.tolist() == [9 + a]
    committed = torch.cat([prompt[0], tree.tokens[0, acc[0, :a]]])[None]
    tree2 = random_tree(torch.tensor([9 + a]), bonus, 320, seed=4)
    logits2, _ = fast.verify(tree2)
    _, _, cache2 = hf_prefill(model, committed, dtype)
    ref2 = hf_tree(model, cache2, tree2, 0, 9 + a)
    n2 = int(tree2.num_nodes[0])
    close(logits2[0, :n2 + 1], ref2[:n2 + 1], dtype)


def test_ragged_batch_matches_per_request_hf(tmp_path):
    dtype = torch.float32
    model, path = make_hf("qwen3", tmp_path)
    fast = FastTarget.from_pretrained(path, device="cpu", dtype=dtype)
    fast.set_feature_layers([1])
    fast.reset(3, 80)
    g = torch.Generator().manual_seed(5)
    lens = [13, 4, 8]
    ids = torch.randint(0, 320, (3, 13), generator=g)
    logits, feats = fast.prefill(ids, torch.tensor(lens))
    caches = []
    for b, L in enumerate(lens):
        ref_logits, hs, cache = hf_prefill(model, ids[b:b + 1, :L], dtype)
        caches.append(cache)
        close(logits[b], ref_logits[0, -1], dtype)
        close(feats[b, :L], hs[2][0], dtype)
    tree = random_tree(torch.tensor(lens), torch.tensor([1, 2, 3]), 320, max_nodes=20, seed=6)
    vlogits, _ = fast.verify(tree)
    for b, L in enumerate(lens):
        n = int(tree.num_nodes[b])
        close(vlogits[b, :n + 1], hf_tree(model, caches[b], tree, b, L)[:n + 1], dtype)


@pytest.mark.parametrize("max_nodes,buckets", [(9, (16, 64)), (9, (64,)), (39, (16, 64))])
def test_bucket_padding_equals_exact_size(max_nodes, buckets, tmp_path):
    """The CPU runs the same padding as the CUDA graphs (tokens, positions, mask rows and words)."""
    dtype = torch.float32
    _, path = make_hf("llama", tmp_path)
    runs = []
    for bk in [(), buckets]:
        fast = FastTarget.from_pretrained(path, device="cpu", dtype=dtype, buckets=bk)
        fast.set_feature_layers([0, 2])
        fast.reset(2, 64)
        ids = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(7))
        fast.prefill(ids, torch.tensor([7, 5]))
        tree = random_tree(fast.context_lens.clone(), torch.tensor([4, 9]), 320, depth=6, k=4,
                           max_nodes=max_nodes, seed=8)
        logits, feats = fast.verify(tree)
        assert logits.shape[1] == tree.num_slots and feats.shape[1] == tree.num_slots
        acc, alen, _ = ddtree.accept_tree(tree.tokens, tree.parents, tree.num_nodes, deepest_path_targets(tree), 6)
        fast.commit(acc, alen)
        ctx = fast.context_lens.tolist()  # compare the committed cache only (past it lies scratch)
        runs.append((logits, feats, [torch.cat([c[b, :, :ctx[b]] for b in range(2)], 1) for c in fast.k_cache + fast.v_cache],
                     fast.context_lens.clone()))
    (l0, f0, k0, c0), (l1, f1, k1, c1) = runs
    assert fast.bucket(tree.num_slots) in buckets
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f1, f0, rtol=1e-5, atol=1e-5)
    assert torch.equal(c1, c0)
    for a, b in zip(k0, k1):  # the committed cache (context + accepted slots) is the same
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_trim_tree_keeps_used_slots(tmp_path):
    _, path = make_hf("qwen3", tmp_path, layers=2)
    fast = FastTarget.from_pretrained(path, device="cpu", dtype=torch.float32)
    fast.reset(1, 128)
    fast.prefill(torch.arange(6)[None], torch.tensor([6]))
    lp, ids = ddtree.topk_marginals(6 * torch.randn(1, 4, 320, generator=torch.Generator().manual_seed(0)), 2)
    # a CaDDTree tree: arrays padded to 41 slots, but a convex verify cost stops it after a few nodes
    cost = (0.2 + 0.002 * torch.arange(41.0).pow(2))[None]
    tree = ddtree.build_tree(lp, ids, torch.tensor([3]), fast.context_lens, 40, cost, 0.1)
    n = int(tree.num_nodes[0])
    assert 0 < n < 40 and tree.num_slots == 41
    small = ddtree.build_tree(lp, ids, torch.tensor([3]), fast.context_lens, n)
    t = tree.trim(n + 1)
    assert t.tree_mask.shape == (1, n + 1, 1)
    full, _ = fast.verify(tree)
    trimmed, _ = fast.verify(t)
    exact, _ = fast.verify(small)
    torch.testing.assert_close(trimmed, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trimmed, full[:, :n + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and ddtree.info()["cuda_kernels"]), reason="needs CUDA kernels")
def test_cuda_graph_verify_matches_eager(tmp_path):
    """Graph replay (padded to a bucket) equals the eager forward of the same tree (bf16, CUDA)."""
    dtype = torch.bfloat16
    _, path = make_hf("qwen3", tmp_path, head_dim=64)  # a head size the CUDA tree_attention takes
    out = []
    for graphs in (False, True):
        fast = FastTarget.from_pretrained(path, device="cuda", dtype=dtype, use_graphs=graphs)
        fast.set_feature_layers([0, 1])
        fast.reset(2, 128)
        fast.prefill(torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1)).cuda(),
                     torch.tensor([9, 6]).cuda())
        rounds = []
        for r in range(3):  # replays across commits: the graph reads the updated context_lens
            tree = random_tree(fast.context_lens.cpu(), torch.tensor([1, 2]), 320, max_nodes=20, seed=10 + r).to("cuda")
            logits, feats = fast.verify(tree)
            rounds.append((logits.clone(), feats.clone()))
            acc, alen, _ = ddtree.accept_tree(tree.tokens, tree.parents, tree.num_nodes,
                                              deepest_path_targets(tree.to("cpu")).cuda(), 5)
            fast.commit(acc, alen)
        out.append(rounds)
    for (l0, f0), (l1, f1) in zip(*out):
        torch.testing.assert_close(l1, l0, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(f1.float(), f0.float(), rtol=2e-2, atol=2e-2)


def test_from_model_equals_from_pretrained(tmp_path):
    model, path = make_hf("qwen3", tmp_path, layers=2)
    ids = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(9))
    outs = []
    for fast in (FastTarget.from_model(model), FastTarget.from_pretrained(path, device="cpu", dtype=torch.float32)):
        fast.reset(1, 16)
        outs.append(fast.prefill(ids, torch.tensor([6]))[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_reset_same_shape_keeps_buffers_and_restarts(tmp_path):
    """A reset to the same shape keeps the cache buffers (captured graphs hold their addresses) yet the
    runner behaves as fresh: the same prompt and tree give the same logits."""
    _, path = make_hf("qwen3", tmp_path, layers=2)
    fast = FastTarget.from_pretrained(path, device="cpu", dtype=torch.float32, buckets=(32,))
    fast.set_feature_layers([1])
    outs, ptrs = [], []
    for seed in (11, 12, 11):  # the middle run leaves different stale K/V behind
        fast.reset(1, 48)
        ptrs.append((fast.k_cache[0].data_ptr(), fast.context_lens.data_ptr()))
        assert fast.context_lens.tolist() == [0]
        ids = torch.randint(0, 320, (1, 8 + seed % 2), generator=torch.Generator().manual_seed(seed))
        fast.prefill(ids, torch.tensor([ids.shape[1]]))
        tree = random_tree(fast.context_lens.clone(), torch.tensor([2]), 320, seed=seed)
        outs.append(fast.verify(tree)[0])
    assert ptrs[0] == ptrs[1] == ptrs[2]
    assert torch.equal(outs[0], outs[2])
    fast.reset(2, 48)  # a new shape reallocates
    assert fast.k_cache[0].shape[0] == 2
