"""The published reference pipeline, reimplemented from the DDTree/CaDDTree description, for the
benchmarks to race against (bench_tree.py: tree construction; bench_e2e.py: whole decoding).

* Tree construction: ``torch.topk`` + ``torch.logsumexp`` on the device, a copy to the host, a Python
  ``heapq`` best-first build, a numpy visibility matrix.
* Decoding: a Hugging Face forward with a dense additive tree mask over a ``DynamicCache``, a Python
  accept walk, per-layer cache compaction.

The Python heap is ``tests/reference.py``'s ``select_nodes`` (the heap of the op contract, the one heap in
this repository), run as a plain Python heap does, with scores summed in double: the reference builds the
trees ``ddtree.build_tree`` builds (up to ties that fp32 rounding would break differently).
"""
from __future__ import annotations

import inspect
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import select_nodes  # noqa: E402

from ddtree.cost import CostModel  # noqa: E402
from ddtree.timing import Clock, median_ms, sync, wall_ms  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Tree construction


def cache_name(model) -> str:
    """The KV cache's argument name: transformers 5.24 renamed past_key_values to cache (the old name
    warns; its removal is announced for 5.40); earlier releases, the GPU machine's among them, know only
    past_key_values."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def reference_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk + torch.logsumexp: [.., V] -> (log-probs [.., k] f32, ids [.., k] i64)."""
    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    vals, ids = torch.topk(logits, k, dim=-1)
    return vals.float() - lse, ids


def python_tree(logprobs: torch.Tensor, token_ids, root: int, max_nodes: int, verify_cost=None,
                draft_cost: float = 0.0) -> tuple[list[int], list[int], list[int]]:
    """One request's tree from host marginals: logprobs ``[D, K]`` f32 (CPU), token_ids ``[D][K]``.
    Returns (tokens, parents, depths) per slot, slot 0 the root. ``verify_cost`` (``max_nodes + 1``
    values) turns on the CaDDTree stop."""
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
    tokens, parents, depths, slot_of = [root], [-1], [0], {(): 0}
    for ranks, _ in select_nodes(logprobs, max_nodes, verify_cost, draft_cost, fp32=False):
        slot_of[ranks] = len(tokens)
        tokens.append(ids[len(ranks) - 1][ranks[-1]])
        parents.append(slot_of[ranks[:-1]])
        depths.append(len(ranks))
    return tokens, parents, depths


def reference_tree_one(logits: torch.Tensor, k: int, max_nodes: int, root: int, ctx: int):
    """One request: logits [D, V] on the GPU -> tokens, parents, depths, positions, visibility [n, n]."""
    lp, ids = reference_topk(logits, k)
    tokens, parents, depths = python_tree(lp.cpu(), ids.cpu(), root, max_nodes)
    n = len(tokens)
    vis = np.zeros((n, n), dtype=bool)
    vis[0, 0] = True
    for i in range(1, n):
        vis[i] = vis[parents[i]]
        vis[i, i] = True
    return tokens, parents, depths, ctx + np.asarray(depths), vis


def reference_tree(logits: torch.Tensor, k: int, max_nodes: int, roots: list, ctxs: list):
    """Every request of logits [B, D, V], one after the other."""
    return [reference_tree_one(logits[b], k, max_nodes, roots[b], ctxs[b]) for b in range(logits.shape[0])]


# --------------------------------------------------------------------------------------------------
# Decoding


class ReferencePipeline:
    """The target side of the reference decoding: HF forwards over a DynamicCache, dense tree masks,
    per-layer compaction. It offers ``embed``/``lm_head``/``dtype`` so the DFlash drafter can run on it."""

    def __init__(self, hf, feature_layer_ids, cost_model: CostModel | None):
        self.hf, self.cost = hf, cost_model
        self.device = next(hf.parameters()).device
        self.dtype = next(hf.parameters()).dtype
        self.embed = hf.get_input_embeddings()
        self.lm_head = lambda h: hf.lm_head(h).float()
        self.ids = list(feature_layer_ids)

    def prefill(self, prompt):
        from transformers import DynamicCache

        self.cache = DynamicCache()
        out = self.hf(prompt, use_cache=True, **{cache_name(self.hf): self.cache}, output_hidden_states=bool(self.ids))
        self.ctx = prompt.shape[1]
        return out.logits[:, -1].float(), self._features(out)

    def _features(self, out):
        if not self.ids:
            return None
        return torch.cat([out.hidden_states[i + 1] for i in self.ids], -1)

    def verify(self, tokens, parents, depths):
        T = len(tokens)
        anc = torch.zeros(T, T, dtype=torch.bool)
        for i in range(T):
            anc[i, i] = True
            if parents[i] >= 0:
                anc[i] |= anc[parents[i]]
        mask = torch.cat([torch.ones(T, self.ctx, dtype=torch.bool), anc], 1).to(self.device)
        bias = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(~mask, torch.finfo(self.dtype).min)
        ids = torch.tensor([tokens], device=self.device)
        pos = torch.tensor([depths], device=self.device) + self.ctx
        out = self.hf(ids, position_ids=pos, attention_mask=bias[None, None], use_cache=True,
                      **{cache_name(self.hf): self.cache},
                      output_hidden_states=bool(self.ids))
        return out.logits.float(), self._features(out)

    def truncate(self, length: int) -> None:
        """Drop every cache entry past ``length`` (undo a verify without committing)."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]

    def compact(self, accepted: list[int]):
        idx = torch.tensor(accepted, device=self.device) + self.ctx
        for layer in self.cache.layers:  # per layer, as the reference does
            layer.keys = torch.cat([layer.keys[:, :, :self.ctx], layer.keys.index_select(2, idx)], 2)
            layer.values = torch.cat([layer.values[:, :, :self.ctx], layer.values.index_select(2, idx)], 2)
        self.ctx += len(accepted)


def run_reference(ref: ReferencePipeline, drafter, oracle_rounds, prompt, new_tokens, max_nodes, device) -> dict:
    """CaDDTree decoding through the reference pipeline, the oracle's marginals and choices standing in
    for the drafter's and the target's (as in bench_e2e's runs of ddtree.decode.generate)."""
    lp_all, ids_all, true_all = oracle_rounds
    D = drafter.block_size - 1
    drafter.reset(1, prompt.shape[1] + new_tokens + 2 * (D + 1) + 8)
    logits, feats = ref.prefill(prompt)
    x = logits.argmax(-1)
    feat_lens = torch.tensor([prompt.shape[1]], device=device)
    lp_host, ids_host, true_host = lp_all.cpu(), ids_all.cpu().tolist(), true_all.cpu().tolist()
    clock, spans, done, r, accepts, sizes = Clock(device), {"draft": [], "verify": []}, 0, 0, [], []
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        while done < new_tokens:
            t0 = clock.mark()
            draft_logits = drafter.draft(ref, x, feats, feat_lens)
            t1 = clock.mark()
            torch.topk(torch.log_softmax(draft_logits.float(), -1), lp_all.shape[2], dim=-1)[0].cpu()  # real cost
            cost = ref.cost.verify_cost(range(max_nodes + 1), ref.ctx).tolist()
            tokens, parents, depths = python_tree(lp_host[r], ids_host[r], int(x), max_nodes, cost, ref.cost.draft_cost)
            t2 = clock.mark()
            vlogits, vfeats = ref.verify(tokens, parents, depths)
            t3 = clock.mark()
            vlogits.argmax(-1).cpu()  # real cost; the oracle's tokens replace it
            children = {}
            for s in range(1, len(tokens)):
                children.setdefault((parents[s], tokens[s]), s)
            path, c = [0], 0
            while (c, true_host[r][depths[c]]) in children:
                c = children[(c, true_host[r][depths[c]])]
                path.append(c)
            ref.compact(path)
            idx = torch.tensor(path, device=device)
            feats, feat_lens = vfeats[:, idx], torch.tensor([len(path)], device=device)
            x = torch.tensor([true_host[r][depths[c]]], device=device)
            spans["draft"].append((t0, t1))
            spans["verify"].append((t2, t3))
            accepts.append(len(path))
            sizes.append(len(tokens) - 1)
            done += len(path)
            r += 1
    sync(device)
    wall = time.perf_counter() - start
    draft_s, verify_s = (sum(clock.seconds(a, b) for a, b in spans[k]) for k in ("draft", "verify"))
    return {"method": "reference_caddtree", "budget": None, "tokens": done, "rounds": r, "seconds": wall,
            "tokens_per_s": done / wall, "acceptance": statistics.mean(accepts), "budgets": sizes,
            "draft_s": draft_s, "verify_s": verify_s, "other_share": max(0.0, 1 - (draft_s + verify_s) / wall)}


def profile_reference(ref: ReferencePipeline, contexts, grid, device, vocab, draft_cost) -> CostModel:
    """Cv(n; l) of the reference verify (dense mask, DynamicCache), fitted like the fast runner's."""
    lp, ids = torch.tensor([[-0.1 * (k + 1) for k in range(8)]] * 15), [list(range(8))] * 15
    med = []
    for ctx in contexts:
        row = []
        ref.prefill(torch.randint(0, vocab, (1, ctx), device=device))
        for n in grid:
            tree = python_tree(lp, ids, 0, n)

            def once():
                ref.verify(*tree)
                ref.truncate(ctx)
            row.append(median_ms(once, device, warmup=1, repeats=3, timer=wall_ms))
        med.append(row)
    return CostModel.fit(grid, contexts, med, draft_cost, meta={"source": "bench_e2e reference profile"})
