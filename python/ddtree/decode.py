"""The decode loop: ``generate(target, drafter, prompts, method=...)``.

One round (``_draft_tree`` then ``_verify_commit``), for a batch of ``B`` requests whose last committed token ``x`` is not yet in the
target's cache:

    drafter.draft -> topk_marginals -> build_tree -> [host sync] -> target.verify (tree_attention)
    -> sample/argmax per slot -> accept_tree -> target.commit (compact_kv)

Between the drafter forward and the target forward only ``ddtree`` ops run; there is no Python loop over
tree nodes, and the host synchronises once per round (in ``generate``: it reads the tree size and the
previous round's committed tokens, to stream them and to stop). Methods: ``ar`` (root-only tree, no
drafter), ``dflash`` (a single chain of the drafter's top-1 tokens, ``K = 1``), ``ddtree`` (best-first
tree of ``max_nodes`` nodes) and ``caddtree`` (the cost-aware budget from ``cost_model``).

Greedy decoding (``temperature == 0``) is token-for-token the target's own greedy decoding. Sampling is
exactly lossless: ``accept_tree`` follows one independent sample per tree slot from the target's
processed distribution (temperature, then top-k, then top-p, as in transformers), so every committed
token is a draw from the target (no rejection sampling: see DESIGN.md, accept_tree).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .ops import DraftTree, accept_tree, build_tree, topk_marginals
from .target import as_target

METHODS = ("ar", "dflash", "ddtree", "caddtree")


@dataclass
class RoundStats:
    """One round. Lists are per request; finished requests commit 0."""

    accept_len: list[int]  # tokens committed this round (accepted path incl. the root; the bonus is next root)
    tree_size: list[int]  # nodes verified (root excluded)
    draft_s: float  # drafter forward
    build_s: float  # topk_marginals + cost table + build_tree
    verify_s: float  # target forward over the tree
    commit_s: float  # per-slot sampling/argmax + accept_tree + compact_kv + bookkeeping


@dataclass
class GenerateOutput:
    tokens: list[list[int]]  # generated tokens per request (a stop token, when hit, is the last one)
    rounds: list[RoundStats] = field(default_factory=list)
    prefill_s: float = 0.0
    total_s: float = 0.0

    @property
    def acceptance_length(self) -> float:
        """Mean tokens committed per round per active request (1.0 = no draft token accepted)."""
        lens = [a for r in self.rounds for a in r.accept_len if a > 0]
        return sum(lens) / max(len(lens), 1)

    @property
    def mean_tree_size(self) -> float:
        sizes = [n for r in self.rounds for n, a in zip(r.tree_size, r.accept_len) if a > 0]
        return sum(sizes) / max(len(sizes), 1)

    @property
    def tokens_per_second(self) -> float:
        return sum(len(t) for t in self.tokens) / max(self.total_s, 1e-9)


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """One token per row of ``logits [..., V]`` f32: argmax when ``temperature == 0``, else one independent
    sample from softmax after temperature, top-k and top-p (in that order, with transformers' rules).
    Returns ``[...]`` i64. No host synchronisation (exponential race instead of ``multinomial``)."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        # transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep at least one.
        sorted_scores, order = torch.sort(scores, dim=-1)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(-1)


def default_cost_model(target):
    """The out-of-the-box estimate from the target's size and the device's measured rates."""
    from .cost import CostModel

    return CostModel.default(target.config, target.device, target.dtype)


class Clock:
    """Timing marks: CUDA events on GPU (read them after a synchronisation), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


@dataclass
class _Plan:
    """What stays fixed across rounds."""

    method: str
    max_nodes: int  # N: tree slots are N + 1
    depth: int  # D: accept width D + 1
    candidates: int  # K per depth
    temperature: float
    top_k: int
    top_p: float
    cost_table: Optional[Callable[[torch.Tensor], torch.Tensor]]  # context_lens -> [B, N+1] Cv (caddtree)
    draft_cost: float
    generator: torch.Generator


def _draft_tree(target, drafter, x, feats, feat_lens, plan: _Plan, clock: Clock):
    """First half of a round, for the whole batch: drafter forward, topk_marginals, build_tree.

    x ``[B]`` i64: last committed tokens (not yet in the target cache). feats ``[B, P, F]``, feat_lens
    ``[B]``: target features of the tokens committed since the drafter last ran. Returns the padded tree
    and the timing marks (t0, t1, t2). No host synchronisation.
    """
    B = x.shape[0]
    t0 = clock.mark()
    if plan.method == "ar":
        # The empty tree: only the root, verified like any other tree.
        logprobs = torch.zeros(B, 1, 1, device=x.device)
        t1 = clock.mark()
        tree = build_tree(logprobs, torch.zeros_like(logprobs, dtype=torch.long), x, target.context_lens, 0)
    else:
        draft_logits = drafter.draft(target, x, feats, feat_lens)  # [B, D, V]
        t1 = clock.mark()
        draft_temp = plan.temperature if plan.temperature > 0 else 1.0
        logprobs, token_ids = topk_marginals(draft_logits, plan.candidates, draft_temp)
        cost, draft_cost = None, 0.0
        if plan.method == "caddtree":
            cost, draft_cost = plan.cost_table(target.context_lens), plan.draft_cost
        tree: DraftTree = build_tree(logprobs, token_ids, x, target.context_lens, plan.max_nodes, cost, draft_cost)
    return tree, (t0, t1, clock.mark())


def _verify_commit(target, tree: DraftTree, x, done, plan: _Plan, clock: Clock):
    """Second half of a round: target forward over the tree, per-slot sample/argmax, accept_tree, commit.

    done ``[B]`` bool: finished requests commit nothing. Returns (emitted ``[B, D+1]`` i64: the new
    tokens, valid up to accept_len; accept_len ``[B]`` i32; next x, feats; timing marks (t3, t4)).
    No host synchronisation.
    """
    logits, vfeats = target.verify(tree)  # [B, T, V], [B, T, F]
    t3 = clock.mark()

    target_tokens = sample_tokens(logits, plan.temperature, plan.top_k, plan.top_p, plan.generator)  # [B, T]
    accepted, accept_len, next_token = accept_tree(tree.tokens, tree.parents, tree.num_nodes, target_tokens, plan.depth)
    accept_len = torch.where(done, torch.zeros_like(accept_len), accept_len)
    target.commit(accepted, accept_len)

    # New tokens this round: the accepted nodes after the root, then the bonus token.
    slots = accepted.clamp(min=0)
    path = tree.tokens.gather(1, slots)  # [B, D+1], root first
    emitted = torch.cat([path[:, 1:], path[:, :1]], dim=1)
    emitted.scatter_(1, (accept_len.long() - 1).clamp(min=0)[:, None], next_token[:, None])
    # What the drafter reads next round: the accepted slots' target features.
    F = vfeats.shape[-1]
    next_feats = vfeats.gather(1, slots[..., None].expand(-1, -1, F)) if F else vfeats[:, : slots.shape[1]]
    next_x = torch.where(done, x, next_token)
    return emitted, accept_len, next_x, next_feats, (t3, clock.mark())


@torch.inference_mode()
def generate(
    target,
    drafter,
    prompts: Sequence[Sequence[int]],
    method: str = "ddtree",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_nodes: int = 64,
    cost_model=None,
    stop_token_ids: Sequence[int] = (),
    seed: int = 0,
    on_tokens: Optional[Callable[[int, list[int]], None]] = None,
) -> GenerateOutput:
    """Decode a batch of prompts (token id lists of any lengths) with ``method`` in :data:`METHODS`.

    target: a :class:`~ddtree.target.TargetRunner` or a Hugging Face causal LM (wrapped by
    :func:`~ddtree.target.as_target`). drafter: a :class:`~ddtree.drafter.DFlashDrafter` (or any object with
    ``block_size``, ``target_layer_ids``, ``reset`` and ``draft``); unused for ``ar``. ``max_nodes`` is the
    DDTree budget and the CaDDTree cap; ``cost_model`` (``.table(context_lens, max_nodes)``, ``.draft_cost``)
    defaults to ``ddtree.cost.CostModel.default``. ``on_tokens(row, new_tokens)`` streams output.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method != "ar" and drafter is None:
        raise ValueError(f"method {method!r} needs a drafter")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    start = time.perf_counter()
    target = as_target(target)
    dev = target.device
    B, lens = len(prompts), [len(p) for p in prompts]
    D = drafter.block_size - 1 if method != "ar" else 0
    N = {"ar": 0, "dflash": D}.get(method, max_nodes)
    # Capacity: prompt + generated + one round's overshoot + the tree slots + the drafter's block.
    S = max(lens) + max_new_tokens + 2 * (D + 1) + N + 2
    cost_table, draft_cost = None, 0.0
    if method == "caddtree":
        from .cost import CostModel

        cost_model = cost_model if cost_model is not None else default_cost_model(target)
        draft_cost = float(cost_model.draft_cost)
        if isinstance(cost_model, CostModel):  # its cached table covers contexts up to the KV capacity
            cost_table = lambda lens: cost_model.table(lens, N, max_context=S)  # noqa: E731
        else:  # any object with .table(context_lens, max_nodes) and .draft_cost
            cost_table = lambda lens: cost_model.table(lens, N)  # noqa: E731
    plan = _Plan(
        method=method, max_nodes=N, depth=D, candidates=1 if method == "dflash" else max(1, min(N, target.vocab_size)),
        temperature=temperature, top_k=top_k, top_p=top_p, cost_table=cost_table, draft_cost=draft_cost,
        generator=torch.Generator(device=dev).manual_seed(seed),
    )
    target.set_feature_layers(list(drafter.target_layer_ids) if method != "ar" else [])
    target.reset(B, S)
    if method != "ar":
        drafter.reset(B, S)

    ids = torch.zeros(B, max(lens), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    lengths = torch.tensor(lens, dtype=torch.long, device=dev)
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=dev)

    logits, feats = target.prefill(ids.to(dev), lengths)
    x = sample_tokens(logits, temperature, top_k, top_p, plan.generator)  # [B]: the first new token
    out = [[t] for t in x.tolist()]  # host sync: the first token
    prefill_s = time.perf_counter() - start
    for b in range(B):
        _emit(out, b, [], stop_token_ids, max_new_tokens, on_tokens, first=True)
    done_host = [_finished(o, stop_token_ids, max_new_tokens) for o in out]
    done = torch.tensor(done_host, device=dev)
    count = torch.ones(B, dtype=torch.long, device=dev)
    feat_lens = lengths
    clock, rounds = Clock(dev), []

    # The one host synchronisation per round sits between build_tree and verify. It reads this round's
    # tree size (the verify forward's shape is a host decision: CaDDTree pads its arrays to max_nodes + 1
    # slots but verification should cost only the slots it chose) together with the previous round's
    # committed tokens (to stream and truncate them) and whether every request has finished (to leave
    # the loop). Deferring the previous round's read to this point costs one unused draft after the last
    # round, instead of a second synchronisation in every round.
    prev = None  # device results of the previous round, read at this round's synchronisation
    while not (prev is None and all(done_host)):  # (finished by the first token alone: no round at all)
        tree, (t0, t1, t2) = _draft_tree(target, drafter, x, feats, feat_lens, plan, clock)
        size = tree.num_nodes.max()[None].long()
        if prev is None:
            packet = size.tolist()
        else:
            emitted, accept_len, num_nodes, marks = prev
            packet = torch.cat([size, accept_len.long(), num_nodes.long(), done.long(), emitted.flatten()]).tolist()
            a, n, d = packet[1 : 1 + B], packet[1 + B : 1 + 2 * B], packet[1 + 2 * B : 1 + 3 * B]
            rows = packet[1 + 3 * B :]
            W = len(rows) // B
            p0, p1, p2, p3, p4 = marks
            rounds.append(RoundStats(
                accept_len=a, tree_size=n, draft_s=clock.seconds(p0, p1), build_s=clock.seconds(p1, p2),
                verify_s=clock.seconds(p2, p3), commit_s=clock.seconds(p3, p4),
            ))
            for b in range(B):
                if not done_host[b]:
                    _emit(out, b, rows[b * W : b * W + a[b]], stop_token_ids, max_new_tokens, on_tokens)
            done_host = [bool(v) for v in d]
        if all(done_host):
            break
        if plan.method == "caddtree":
            tree = tree.trim(packet[0] + 1)
        emitted, accept_len, x, feats, (t3, t4) = _verify_commit(target, tree, x, done, plan, clock)
        feat_lens = accept_len
        # Stop bookkeeping on the device, so that the round needs nothing from the host.
        valid = torch.arange(emitted.shape[1], device=dev) < accept_len[:, None]
        count += accept_len
        hit = torch.isin(emitted, stops).logical_and(valid).any(1) if len(stops) else torch.zeros_like(done)
        done = done | hit | (count >= max_new_tokens)
        prev = (emitted, accept_len, tree.num_nodes, (t0, t1, t2, t3, t4))
    return GenerateOutput(out, rounds, prefill_s, time.perf_counter() - start)


def _emit(out, b, new, stop_token_ids, max_new_tokens, on_tokens, first=False):
    """Append ``new`` to request ``b``, cut after the first stop token and at ``max_new_tokens``."""
    before = 0 if first else len(out[b])
    seq = out[b] + list(new)
    stop_at = next((i for i, t in enumerate(seq) if t in stop_token_ids), None)
    if stop_at is not None:
        seq = seq[: stop_at + 1]
    out[b][:] = seq[:max_new_tokens]
    if on_tokens is not None and len(out[b]) > before:
        on_tokens(b, out[b][before:])


def _finished(seq, stop_token_ids, max_new_tokens) -> bool:
    return len(seq) >= max_new_tokens or any(t in stop_token_ids for t in seq)
