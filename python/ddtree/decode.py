"""The decode loop: ``generate(target, drafter, prompts, method=...)``.

One round, for a batch of ``B`` requests whose last committed token ``x`` is not yet in the target's
cache, as ``generate`` runs it:

    _draft_tree      drafter.draft -> topk_marginals -> build_tree
    _HostRead.take   [host sync] this round's tree size; the previous round's tokens, stats, stop flags
    _verify_commit   target.verify (tree_attention) -> sample/argmax per slot -> accept_tree
                     -> target.commit (compact_kv)
    _stop_rule       on the device: which new tokens each request emits, which requests are done

Between the drafter forward and the target forward only ``ddtree`` ops run; there is no Python loop over
tree nodes, and the host synchronises once per round (twice in the last round or two, when the round may
reach ``max_new_tokens``: so no drafter forward runs after the last round). Methods: ``ar`` (root-only tree, no
drafter), ``dflash`` (a single chain of the drafter's top-1 tokens, ``K = 1``), ``ddtree`` (best-first
tree of ``max_nodes`` nodes) and ``caddtree`` (the cost-aware budget from ``cost_model``).

CaDDTree's ``budget_mode`` (see ``build_tree``): ``"request"`` sizes each request's tree by its own
batch-1 cost curve; ``"batch"`` picks one node count ``n`` for the whole batch from the padded cost of
``B`` requests with ``n`` nodes; ``"ragged"`` picks the batch's ``t`` most probable nodes from the cost of
``B`` roots plus ``t`` nodes. Every round verifies the tree trimmed to the largest request's node count
plus the root, one padded ``[B, n + 1]`` forward: in batch mode exactly the forward the budget priced.
No runner here (``HFTarget``, ``FastTarget``) has a varlen verify, so ragged mode runs that same padded
forward: its decision assumes a ragged forward's cost, the forward it gets is padded.

Greedy decoding (``temperature == 0``) is token-for-token the target's own greedy decoding. Sampling is
exactly lossless: ``accept_tree`` follows one independent sample per tree slot from the target's
processed distribution (temperature, then top-k, then top-p, as in transformers), so every committed
token is a draw from the target (no rejection sampling: see docs/DESIGN.md, accept_tree).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from .ops import DraftTree, accept_tree, build_tree, topk_marginals
from .target import as_target
from .threads import with_cpu_threads
from .timing import Clock

METHODS = ("ar", "dflash", "ddtree", "caddtree")
BUDGET_MODES = ("request", "batch", "ragged")


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
    host_syncs: int = 0  # host synchronisations of the decode loop: one a round, plus one in each round read
    # at its end (only where the round may reach max_new_tokens), plus one when a stop token ends the batch

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


@dataclass
class _Plan:
    """How every round runs: the method settled once, with the sampling settings and the KV capacity."""

    drafts: bool  # False for ar: the tree is the root alone and no drafter runs
    trims: bool  # caddtree: its tree arrays have max_nodes + 1 slots, it verifies only the slots it chose
    max_nodes: int  # N: tree slots are N + 1
    depth: int  # D: accept width D + 1
    candidates: int  # K per depth
    capacity: int  # S: KV cache positions per request
    cost_table: Optional[Callable[[torch.Tensor], torch.Tensor]]  # context_lens -> budget_mode's Cv table (caddtree)
    draft_cost: float
    budget_mode: str  # caddtree: request, batch or ragged (see build_tree); request for the other methods
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator

    @classmethod
    def settle(cls, method, target, drafter, prompt_lens, max_new_tokens, max_nodes, cost_model, budget_mode,
               temperature, top_k, top_p, seed) -> "_Plan":
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if budget_mode not in BUDGET_MODES:
            raise ValueError(f"unknown budget_mode {budget_mode!r}; choose from {', '.join(BUDGET_MODES)}")
        if budget_mode != "request" and method != "caddtree":
            raise ValueError(f"budget_mode {budget_mode!r} needs method 'caddtree' (the only cost-aware budget), "
                             f"got method {method!r}")
        if method != "ar" and drafter is None:
            raise ValueError(f"method {method!r} needs a drafter")
        D = drafter.block_size - 1 if method != "ar" else 0
        N = {"ar": 0, "dflash": D}.get(method, max_nodes)
        # Capacity: prompt + generated + one round's overshoot + the tree slots + the drafter's block.
        S = max(prompt_lens) + max_new_tokens + 2 * (D + 1) + N + 2
        cost_table, draft_cost = None, 0.0
        if method == "caddtree":
            cost_model = cost_model if cost_model is not None else default_cost_model(target)
            draft_cost = float(cost_model.draft_cost)
            if budget_mode == "request":
                cost_table = lambda lens: cost_model.table(lens, N, S)  # noqa: E731
            else:  # one decision for the batch: priced at its size (fixed for the whole call)
                cost_table = lambda lens: cost_model.table(lens, N, S, mode=budget_mode)  # noqa: E731
                if hasattr(cost_model, "draft_cost_at"):
                    draft_cost = float(cost_model.draft_cost_at(len(prompt_lens)))
        return cls(
            drafts=method != "ar", trims=method == "caddtree", max_nodes=N, depth=D,
            candidates=1 if method == "dflash" else max(1, min(N, target.vocab_size)), capacity=S,
            cost_table=cost_table, draft_cost=draft_cost, budget_mode=budget_mode, temperature=temperature,
            top_k=top_k, top_p=top_p,
            generator=torch.Generator(device=target.device).manual_seed(seed),
        )


class _Marks(NamedTuple):
    """Timing marks of one round (see :class:`~ddtree.timing.Clock`)."""

    start: object
    drafted: object  # drafter forward done
    built: object  # topk_marginals + build_tree done
    verified: object  # target forward done
    committed: object  # sampling, accept_tree, compact_kv, stop rule done


@dataclass
class _Round:
    """One round's results, left on the device until the next round's host synchronisation reads them."""

    new_tokens: torch.Tensor  # [B, D+1] i64: the accepted nodes after the root, then the bonus token
    keep: torch.Tensor  # [B] i64: how many of them the stop rule lets through
    accept_len: torch.Tensor  # [B] i32
    tree_size: torch.Tensor  # [B] i32
    done: torch.Tensor  # [B] bool, after this round
    marks: _Marks


class _HostRead(NamedTuple):
    """What the host learns at a round's one synchronisation: the slots to verify this round and, from
    the previous round (when there is one), its tokens, statistics and which requests are done."""

    slots: int
    new_tokens: list[list[int]]  # per request, only the tokens to emit
    stats: Optional[RoundStats]
    done: list[bool]

    @classmethod
    def take(cls, tree: Optional[DraftTree], prev: Optional[_Round], clock: Clock) -> "_HostRead":
        """Read ``tree``'s size (``None``: no tree yet, ``slots`` 0) and ``prev``'s results in one sync."""
        if prev is None:
            return cls(int(tree.num_nodes.max().item()) + 1, [], None, [])
        # One row per request: this round's tree size, then the previous round's keep, accept_len,
        # tree size, done flag and new tokens.
        size = tree.num_nodes.max()[None].long() if tree is not None else prev.keep.new_full((1,), -1)
        columns = (size.expand(prev.keep.shape[0]), prev.keep, prev.accept_len, prev.tree_size, prev.done)
        rows = torch.cat([torch.stack([c.long() for c in columns], 1), prev.new_tokens], 1).tolist()  # host sync
        m = prev.marks
        stats = RoundStats(
            accept_len=[r[2] for r in rows], tree_size=[r[3] for r in rows], draft_s=clock.seconds(m.start, m.drafted),
            build_s=clock.seconds(m.drafted, m.built), verify_s=clock.seconds(m.built, m.verified),
            commit_s=clock.seconds(m.verified, m.committed),
        )
        return cls(rows[0][0] + 1, [r[5:5 + r[1]] for r in rows], stats, [bool(r[4]) for r in rows])


def _stop_rule(new_tokens, valid, count, done, stops, max_new_tokens):
    """The one stop rule, on the device. new_tokens ``[B, W]`` of which the first ``valid [B]`` are real;
    count ``[B]`` i64 tokens emitted so far; done ``[B]`` bool. A request emits its tokens up to and
    including the first stop token, at most ``max_new_tokens`` in all, and nothing once done. Returns
    (keep ``[B]`` i64, count, done)."""
    col = torch.arange(new_tokens.shape[1], device=new_tokens.device)
    is_stop = torch.isin(new_tokens, stops) & (col < valid[:, None])
    upto_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, valid.long())
    keep = torch.where(done, 0, torch.minimum(upto_stop, max_new_tokens - count).clamp(min=0))
    count = count + keep
    done = done | (count >= max_new_tokens) | (is_stop & (col < keep[:, None])).any(1)
    return keep, count, done


def _prefill(target, prompts, plan: _Plan):
    """The prompts' forward: returns the first new token ``[B]``, the target features ``[B, L, F]`` and
    the prompt lengths ``[B]`` (the features the drafter reads first)."""
    dev = target.device
    lens = [len(p) for p in prompts]
    ids = torch.zeros(len(prompts), max(lens), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    lengths = torch.tensor(lens, dtype=torch.long, device=dev)
    logits, feats = target.prefill(ids.to(dev), lengths)
    return sample_tokens(logits, plan.temperature, plan.top_k, plan.top_p, plan.generator), feats, lengths


def _draft_tree(target, drafter, x, feats, feat_lens, done, plan: _Plan, clock: Clock):
    """First half of a round, for the whole batch: drafter forward, topk_marginals, build_tree.

    x ``[B]`` i64: last committed tokens (not yet in the target cache). feats ``[B, P, F]``, feat_lens
    ``[B]``: target features of the tokens committed since the drafter last ran. done ``[B]`` bool: in
    the batch budget modes a finished request's nodes count as probability 0, so the one decision for the
    batch weighs only live requests' gains. Returns the padded tree and the marks (start, drafted,
    built). No host synchronisation.
    """
    start = clock.mark()
    if not plan.drafts:
        # The empty tree: only the root, verified like any other tree.
        logprobs = torch.zeros(x.shape[0], 1, 1, device=x.device)
        drafted = clock.mark()
        tree = build_tree(logprobs, torch.zeros_like(logprobs, dtype=torch.long), x, target.context_lens, 0)
        return tree, (start, drafted, clock.mark())
    draft_logits = drafter.draft(target, x, feats, feat_lens)  # [B, D, V]
    drafted = clock.mark()
    draft_temp = plan.temperature if plan.temperature > 0 else 1.0
    logprobs, token_ids = topk_marginals(draft_logits, plan.candidates, draft_temp)
    if plan.budget_mode != "request":
        logprobs = logprobs.masked_fill(done[:, None, None], float("-inf"))
    cost = plan.cost_table(target.context_lens) if plan.cost_table is not None else None
    tree = build_tree(logprobs, token_ids, x, target.context_lens, plan.max_nodes, cost, plan.draft_cost,
                      plan.budget_mode)
    return tree, (start, drafted, clock.mark())


def _verify_commit(target, tree: DraftTree, x, done, plan: _Plan, clock: Clock):
    """Second half of a round: target forward over the tree, per-slot sample/argmax, accept_tree, commit.

    done ``[B]`` bool: finished requests commit nothing. Returns (new tokens ``[B, D+1]`` i64, valid up to
    accept_len; accept_len ``[B]`` i32; next x; next feats; the verified mark). No host synchronisation.
    """
    logits, vfeats = target.verify(tree)  # [B, T, V], [B, T, F]
    verified = clock.mark()
    target_tokens = sample_tokens(logits, plan.temperature, plan.top_k, plan.top_p, plan.generator)  # [B, T]
    accepted, accept_len, next_token = accept_tree(tree.tokens, tree.parents, tree.num_nodes, target_tokens, plan.depth)
    accept_len = torch.where(done, torch.zeros_like(accept_len), accept_len)
    target.commit(accepted, accept_len)

    # New tokens this round: the accepted nodes after the root, then the bonus token.
    slots = accepted.clamp(min=0)
    path = tree.tokens.gather(1, slots)  # [B, D+1], root first
    new_tokens = torch.cat([path[:, 1:], path[:, :1]], dim=1)
    new_tokens.scatter_(1, (accept_len.long() - 1).clamp(min=0)[:, None], next_token[:, None])
    # What the drafter reads next round: the accepted slots' target features.
    F = vfeats.shape[-1]
    next_feats = vfeats.gather(1, slots[..., None].expand(-1, -1, F)) if F else vfeats[:, : slots.shape[1]]
    return new_tokens, accept_len, torch.where(done, x, next_token), next_feats, verified


@with_cpu_threads  # keyword threads='auto': one CPU thread for a small model (see ddtree.threads)
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
    budget_mode: str = "request",
    stop_token_ids: Sequence[int] = (),
    seed: int = 0,
    on_tokens: Optional[Callable[[int, list[int]], None]] = None,
) -> GenerateOutput:
    """Decode a batch of prompts (token id lists of any lengths) with ``method`` in :data:`METHODS`.

    target: a :class:`~ddtree.target.TargetRunner` or a Hugging Face causal LM (wrapped by
    :func:`~ddtree.target.as_target`). drafter: a :class:`~ddtree.drafter.DFlashDrafter` (or any object with
    ``block_size``, ``target_layer_ids``, ``reset`` and ``draft``); unused for ``ar``. ``max_nodes`` is the
    DDTree budget and the CaDDTree cap; ``cost_model`` (``.table(context_lens, max_nodes, max_context)``,
    ``.draft_cost``) defaults to ``ddtree.cost.CostModel.default``. ``budget_mode`` (``caddtree`` only; see
    :data:`BUDGET_MODES` and the module docstring) is how CaDDTree prices the batch's verify: per request,
    one node count for the padded batch, or the batch's most probable nodes under a ragged cost; the batch
    modes call ``cost_model.table(..., mode=budget_mode)`` and ``cost_model.draft_cost_at(B)`` when it has
    one. ``on_tokens(row, new_tokens)`` streams output. Keyword ``threads``: torch's CPU threads during the
    call (``"auto"``: one for a CPU target under ``ddtree.threads.SMALL_MODEL_PARAMS`` parameters, else
    untouched; ``None``: untouched; or a count).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    start = time.perf_counter()
    target = as_target(target)
    plan = _Plan.settle(method, target, drafter, [len(p) for p in prompts], max_new_tokens, max_nodes, cost_model,
                        budget_mode, temperature, top_k, top_p, seed)
    B, dev = len(prompts), target.device
    target.set_feature_layers(list(drafter.target_layer_ids) if plan.drafts else [])
    target.reset(B, plan.capacity)
    if plan.drafts:
        drafter.reset(B, plan.capacity)
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=dev)

    # The first token, from the prefill; the stop rule may already end a request here.
    x, feats, feat_lens = _prefill(target, prompts, plan)
    none_yet = torch.zeros_like(x)
    _, count, done = _stop_rule(x[:, None], torch.ones_like(x), none_yet, none_yet.bool(), stops, max_new_tokens)
    first, finished = torch.stack([x, done.long()]).tolist()  # host sync: time to first token
    prefill_s = time.perf_counter() - start
    out, done_host = [[t] for t in first], [bool(d) for d in finished]
    if on_tokens is not None:
        for b in range(B):
            on_tokens(b, out[b][:])

    clock, rounds = Clock(dev), []
    prev: Optional[_Round] = None  # the last round's results, read at this round's host synchronisation
    syncs = 0  # GenerateOutput.host_syncs

    def emit(read: _HostRead) -> list[bool]:
        """Take in one round's results as read by the host: statistics, streamed tokens, done flags."""
        rounds.append(read.stats)
        for b, new in enumerate(read.new_tokens):
            if new:
                out[b] += new
                if on_tokens is not None:
                    on_tokens(b, new)
        return read.done

    while not all(done_host):
        tree, (t_start, t_drafted, t_built) = _draft_tree(target, drafter, x, feats, feat_lens, done, plan, clock)
        # The one host synchronisation of a round: this round's tree size (the verify forward's shape is a
        # host decision) with the previous round's tokens, statistics and stop flags. Reading the previous
        # round here, not at its end, saves a second synchronisation in every round.
        read, syncs = _HostRead.take(tree, prev, clock), syncs + 1
        if prev is not None:
            done_host = emit(read)
            if all(done_host):
                break  # ended by a stop token: this round's draft goes unused
        if plan.trims:
            tree = tree.trim(read.slots)
        new_tokens, accept_len, x, feats, t_verified = _verify_commit(target, tree, x, done, plan, clock)
        keep, count, next_done = _stop_rule(new_tokens, accept_len, count, done, stops, max_new_tokens)
        feat_lens = accept_len
        marks = _Marks(t_start, t_drafted, t_built, t_verified, clock.mark())
        prev = _Round(new_tokens, keep, accept_len, tree.num_nodes, next_done, marks)
        done = next_done
        # When this round may have brought every live request to max_new_tokens (the host knows the
        # counts up to the last round; a round adds at most D + 1), read it now: one more synchronisation
        # in the last round or two instead of a whole drafter forward whose tree nobody verifies.
        if plan.drafts and all(d or len(o) + plan.depth + 1 >= max_new_tokens for d, o in zip(done_host, out)):
            done_host, prev, syncs = emit(_HostRead.take(None, prev, clock)), None, syncs + 1
    return GenerateOutput(out, rounds, prefill_s, time.perf_counter() - start, syncs)
