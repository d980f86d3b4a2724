"""Batch-coupled budgets against per-request CaDDTree and fixed budgets: an exact simulation of greedy
decoding with the shipped trained pair, priced by two cost models.

Why a simulation is exact here. Greedy speculative decoding outputs the target's own greedy text
whatever the tree policy, so for every request the greedy continuation ``g`` is fixed in advance, and
so is what the drafter sees at each point: a round that starts with ``k`` tokens generated drafts from
the block ``[g[k-1], MASK, ...]`` over the target features of the prompt and ``g[:k-1]``. This script
precomputes, per held-out prompt, the greedy continuation (``generate(method="ar")``) and the drafter's
logits at every ``k`` (``DFlashDrafter.draft`` over the target features of one causal forward of the
prompt and the continuation). A round under any policy is then the real pipeline on those logits:
``topk_marginals`` -> ``build_tree`` (the policy's mode and cost row) -> ``accept_tree`` with the
target's token at each slot set to the next greedy token after the slot's depth (exact on every slot
the walk can reach: a slot is reached only when its path is the greedy one) -> ``k += accept_len``.
The script checks this against real ``generate`` runs (per request, per round: accepted length and
tree size) for fixed budgets and per-request CaDDTree before it reports anything.

Batches: the same ``R`` held-out prompts (different files and positions, so difficulty differs), every
request generating ``M`` tokens. ``--schedule static`` (default) splits them into groups of ``B``, each
group one batch from which a finished request leaves (the verify covers the active requests only), so a
batch ends with a tail of few active requests; ``--schedule refill`` keeps ``B`` slots filled from the
queue (continuous batching; prefills not modelled), so the tail is only at the very end. A round's
modelled time is ``Cd(B') + verify`` for the ``B'`` active requests, the verify priced by the forward the
policy implies:

* padded (one ``[B', max_b n_b + 1]`` forward): fixed budgets, per-request CaDDTree, batch mode;
* ragged (a varlen forward over ``B' + sum_b n_b`` slots): ragged mode; fixed budgets and per-request
  CaDDTree are priced ragged too (rows ``*-ragged``), so ragged mode meets them on equal terms.

Policies: fixed ``n`` in {1, 2, 4, 8, 16, 32, 64}; per-request CaDDTree (``budget_mode="request"``,
each row the batch-1 curve and the batch-1 draft cost: what a batch-1 profile gives); batch mode
(``[1, N+1]`` row: padded cost of ``B'`` requests with ``n`` nodes); ragged mode (``[1, B'N+1]`` row:
cost of ``B'`` roots plus ``t`` nodes). ``N = 64`` caps the adaptive policies (decode's default).

Cost sources (the assumptions are printed with the results):

* ``a800``: the published CaDDTree Qwen3-8B A800 curve (context 1; our contexts are under 300 tokens)
  read as a function of the total slots of a forward, ``Cv(S slots) = curve[S - 1]`` (extended with its
  last slope past 513 slots): a batch of ``B`` requests with ``n`` nodes each costs what one request
  with ``B(n+1) - 1`` nodes costs. It ignores the per-request KV reads. ``Cd`` = the published 6.5 ms,
  the same at every batch size.
* ``cpu``: this machine, the shipped target through the runner generation uses (``HFTarget``),
  ``ddtree.cost.profile(runner, batch_size=B)`` at one context (mean prompt length + M/2) for ``B`` in
  {1, 4, 16, 64} (padded forwards), the drafter round timed at each ``B``; per point the least of
  ``--passes`` interleaved passes' medians (a shared machine's load only slows forwards down), refitted
  non-decreasing; between profiled batch sizes linear in ``B``.
  There is no varlen runner, so the ragged cost of ``B'`` roots + ``t`` nodes is modelled as the padded
  cost of ``B'`` rows at the same total slots (``n = (B' + t) / B' - 1``, interpolated).

    PYTHONPATH=python python bench/bench_batch_budget.py --out out/batch_budget
    PYTHONPATH=python python bench/bench_batch_budget.py --schedule refill --requests 256 --out out/batch_budget_refill
    PYTHONPATH=python python bench/bench_batch_budget.py --quick --out /tmp/bb   # smoke run, < 1 min
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import ddtree
from ddtree import cost as costmod
from ddtree import decode, demo, train
from ddtree.drafter import DFlashDrafter
from ddtree.target import load_target

REPO = Path(__file__).resolve().parent.parent
A800_CURVES = REPO / "tests" / "data" / "caddtree_cost_curves_a800.json"
BATCH_SIZES = (1, 4, 16, 64)
FIXED_BUDGETS = (1, 2, 4, 8, 16, 32, 64)
CAP = 64  # N for the adaptive policies


# ---- the requests: prompts, greedy continuations, drafter logits --------------------------------


@dataclass
class Requests:
    """``R`` requests. prompt_lens ``[R]``; greedy ``[R, M + D + 1]`` the target's greedy tokens (``g[0]``
    comes from the prefill); logits ``[R, M, D, V]`` f32, ``logits[r, k - 1]`` the drafter's output in a
    round that starts with ``k`` tokens generated (``k = 1..M-1``; row ``M - 1`` unused)."""

    prompts: list[list[int]]
    prompt_lens: torch.Tensor
    greedy: torch.Tensor
    logits: torch.Tensor
    new_tokens: int  # M
    depth: int  # D


def held_out_prompts(count: int, seed: int) -> list[list[int]]:
    """``count`` windows of the held-out stdlib text (the split ``ddtree train`` left out), lengths
    32..96 so that contexts are ragged."""
    _, held = train.load_corpus(held_out_only=True)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(32, 97, (count,), generator=g).tolist()
    starts = torch.randint(0, held.numel() - 100, (count,), generator=g).tolist()
    return [held[s: s + n].tolist() for s, n in zip(starts, lens)]


@torch.inference_mode()
def precompute(target, drafter, prompts: list[list[int]], new_tokens: int) -> Requests:
    M, D = new_tokens, drafter.block_size - 1
    greedy = decode.generate(target, drafter, prompts, method="ar", max_new_tokens=M + D + 1).tokens
    greedy = torch.tensor(greedy, dtype=torch.long)
    logits = torch.zeros(len(prompts), M, D, target.vocab_size)
    target.set_feature_layers(list(drafter.target_layer_ids))
    for r, prompt in enumerate(prompts):
        # Features of the prompt and g[:M-2]: the longest committed prefix a round with k <= M-1 reads.
        seq = torch.tensor(prompt + greedy[r, : M - 2].tolist())[None]
        L = seq.shape[1]
        target.reset(1, L + 1)
        _, feats = target.prefill(seq, torch.tensor([L]))
        k = torch.arange(1, M)  # rounds starting with k tokens generated
        rows = len(k)
        drafter.reset(rows, L + D + 2)
        ctx = len(prompt) + k - 1  # committed tokens in the target cache at that round
        logits[r, : M - 1] = drafter.draft(target, greedy[r, k - 1], feats.expand(rows, -1, -1), ctx).float()
    return Requests(prompts, torch.tensor([len(p) for p in prompts]), greedy, logits, M, D)


# ---- cost sources ---------------------------------------------------------------------------------


class CostSource:
    """Modelled times in ms: ``draft(B)``, ``padded(B, n)`` (a ``[B, n+1]`` forward; ``n`` may be an array
    and fractional) and ``ragged(B, t)`` (``B`` roots plus ``t`` nodes in a varlen forward)."""

    name: str
    assumption: str

    def draft(self, B: int) -> float:
        raise NotImplementedError

    def padded(self, B: int, n) -> np.ndarray:
        raise NotImplementedError

    def ragged(self, B: int, t) -> np.ndarray:
        raise NotImplementedError

    # the tables build_tree reads, cached per (mode, B)
    def row(self, mode: str, B: int) -> tuple[torch.Tensor, float]:
        key = (mode, B)
        cache = self.__dict__.setdefault("_rows", {})
        if key not in cache:
            if mode == "request":  # what a batch-1 profile gives every request
                values, dc = self.padded(1, np.arange(CAP + 1)), self.draft(1)
                values = np.broadcast_to(values, (B, CAP + 1))
            elif mode == "batch":
                values, dc = self.padded(B, np.arange(CAP + 1))[None], self.draft(B)
            else:
                values, dc = self.ragged(B, np.arange(B * CAP + 1))[None], self.draft(B)
            cache[key] = (torch.tensor(np.ascontiguousarray(values), dtype=torch.float32), float(dc))
        return cache[key]


class SlotCurve(CostSource):
    """One batch-1 curve read as a function of a forward's total slots; a constant draft cost."""

    def __init__(self, name: str, curve_ms: np.ndarray, draft_ms: float, assumption: str):
        self.name, self.draft_ms, self.assumption = name, draft_ms, assumption
        self.curve = np.asarray(curve_ms, np.float64)

    def slots(self, S) -> np.ndarray:
        n = np.asarray(S, np.float64) - 1
        return costmod.eval_curves(np.arange(len(self.curve)), self.curve, np.atleast_1d(n))

    def draft(self, B):
        return self.draft_ms

    def padded(self, B, n):
        return self.slots(B * (np.asarray(n, np.float64) + 1))

    def ragged(self, B, t):
        return self.slots(B + np.asarray(t, np.float64))


def a800_source(path: Path = A800_CURVES) -> SlotCurve:
    model = json.loads(path.read_text())["models"]["Qwen3-8B"]
    curve = np.asarray(model["verify_cost"]["1"]) * 1e3  # seconds -> ms, n = 0..512
    return SlotCurve("a800", curve, model["draft_cost"] * 1e3, (
        "published CaDDTree Qwen3-8B A800 batch-1 curve at context 1, read as a function of the total slots "
        "of the forward (B requests x (n+1) slots cost what one request with B(n+1)-1 nodes costs; per-request "
        "KV reads ignored), extended linearly past 513 slots; draft cost 6.5 ms at every B"))


class MeasuredBatches(CostSource):
    """Profiled padded curves at a few batch sizes (from 1), read through one ``CostModel`` with batch
    curves: linear in ``B`` between them; ragged = padded at the same total slots (the model's rules)."""

    def __init__(self, name: str, models: dict[int, costmod.CostModel], context: int, assumption: str):
        self.name, self.models, self.context, self.assumption = name, dict(sorted(models.items())), context, assumption
        sizes = list(self.models)
        first, rest = self.models[sizes[0]], [self.models[B] for B in sizes[1:]]
        self.model = costmod.CostModel(first.node_grid, first.contexts, first.verify_ms, first.draft_cost,
                                       batch_sizes=sizes, batch_verify_ms=np.array([m.verify_ms for m in rest]).reshape(
                                           len(rest), *first.verify_ms.shape),
                                       batch_draft_ms=[m.draft_cost for m in rest])

    def draft(self, B):
        return self.model.draft_cost_at(B)

    def padded(self, B, n):
        return self.model.padded_cost(B, n, self.context)

    def ragged(self, B, t):
        return self.model.ragged_cost(B, t, self.context)


def cpu_source(target, drafter, batch_sizes, context: int, node_grid, repeats: int, passes: int) -> MeasuredBatches:
    """``passes`` rounds of ``ddtree.cost.profile`` over every batch size, then per point the smallest of
    the passes' medians, refitted: other processes on a shared machine only ever slow a forward down, and
    a load burst during one pass should not shape the curve."""
    F = len(drafter.target_layer_ids) * target.hidden_size
    runs = {B: [] for B in batch_sizes}
    for _ in range(passes):
        for B in batch_sizes:  # interleaved, so a burst hits one pass of each size, not every pass of one
            drafter.reset(B, context + drafter.block_size + 1)
            drafter.extend(torch.zeros(B, context, F, dtype=target.dtype), torch.full((B,), context))
            roots = zero = torch.zeros(B, dtype=torch.long)
            nothing = torch.zeros(B, 0, F)
            runs[B].append(costmod.profile(target, lambda: drafter.draft(target, roots, nothing, zero),
                                           max_nodes=max(node_grid), contexts=[context], node_grid=node_grid,
                                           warmup=2, repeats=repeats, batch_size=B, progress=False))
    models = {}
    for B, ms in runs.items():
        medians = np.array([m.measured["verify_median_ms"][0] for m in ms])  # [passes, G]
        drafts = np.array([m.measured["draft_median_ms"] for m in ms])
        models[B] = costmod.CostModel.fit(node_grid, [context], medians.min(0)[None], float(drafts.min()),
                                          meta={**ms[0].meta, "passes": passes})
        models[B].measured["verify_median_ms_per_pass"] = medians.tolist()
        models[B].measured["draft_median_ms_per_pass"] = drafts.tolist()
    return MeasuredBatches("cpu", models, context, (
        f"this CPU, shipped target via HFTarget, ddtree.cost.profile(batch_size=B) at context {context} for "
        f"B in {list(batch_sizes)} (padded forwards; per point the least of {passes} passes' medians of {repeats} "
        "calls, refitted non-decreasing; linear in B between profiled sizes), drafter round timed per B the same "
        "way; no varlen runner exists: ragged cost = padded cost of the same rows at the same total slots"))


def calibration(req: Requests) -> list[dict]:
    """How the drafter's path probabilities compare with what the target accepts: every node of the
    64-node trees at every round start of every request, binned by its path probability ``p``; a node
    is a hit when its path is the greedy continuation."""
    M, D = req.new_tokens, req.depth
    p_all, hit_all = [], []
    for r in range(len(req.prompts)):
        ks, rows = torch.arange(1, M), torch.full((M - 1,), r)
        lp, ids = ddtree.topk_marginals(req.logits[rows, ks - 1], CAP, 1.0)
        tree = ddtree.build_tree(lp, ids, req.greedy[rows, ks - 1], req.prompt_lens[rows] + ks - 1, CAP)
        target_tokens = req.greedy[rows[:, None], ks[:, None] + tree.depths.long()]
        accepted, _, _ = ddtree.accept_tree(tree.tokens, tree.parents, tree.num_nodes, target_tokens, D)
        hit = torch.zeros(tree.tokens.shape, dtype=torch.bool).scatter_(1, accepted.clamp(min=0), True)
        used = torch.arange(tree.num_slots) <= tree.num_nodes[:, None].long()
        used[:, 0] = False  # the root is not a draft node
        p_all.append(tree.scores.exp()[used])
        hit_all.append(hit[used])
    p, hit = torch.cat(p_all).double(), torch.cat(hit_all).double()
    edges = (0.0, 0.001, 0.01, 0.03, 0.1, 0.3, 0.6, 0.9, 1.0 + 1e-9)
    out = []
    for lo, hi in zip(edges, edges[1:]):
        m = (p >= lo) & (p < hi)
        if bool(m.any()):
            out.append({"p_from": lo, "p_to": min(hi, 1.0), "nodes": int(m.sum()), "mean_p": float(p[m].mean()),
                        "hit_rate": float(hit[m].mean())})
    return out


# ---- the simulation ---------------------------------------------------------------------------------


@dataclass
class Policy:
    name: str
    mode: str  # "fixed", "request", "batch", "ragged"
    budget: int = CAP


def policies() -> list[Policy]:
    return [Policy(f"fixed-{n}", "fixed", n) for n in FIXED_BUDGETS] + [
        Policy("caddtree", "request"), Policy("batch", "batch"), Policy("ragged", "ragged")]


@dataclass
class Trace:
    """Per round: the active requests' tree sizes and accepted lengths (root counted); tokens committed."""

    sizes: list[np.ndarray] = field(default_factory=list)
    accepts: list[np.ndarray] = field(default_factory=list)
    expected: list[np.ndarray] = field(default_factory=list)  # the drafter's estimate: 1 + sum of path probabilities
    tokens: int = 0
    per_request: dict = field(default_factory=dict)  # request -> [(accept_len, tree_size), ...]


@torch.inference_mode()
def simulate(req: Requests, queue: list[int], policy: Policy, source: CostSource | None,
             slots: int | None = None) -> Trace:
    """Run the requests ``queue`` under ``policy`` (cost rows from ``source``) in a batch of ``slots``
    (default: all of them at once). A request leaves when it has its tokens; the next queued one takes
    its slot from the next round on (its prefill is not modelled)."""
    M, D = req.new_tokens, req.depth
    V = req.logits.shape[-1]
    K = max(1, min(policy.budget, V))  # candidates per depth, as generate picks them
    pending = list(queue)
    slots = len(pending) if slots is None else slots
    running = pending[:slots]
    del pending[:slots]
    k = {r: 1 for r in queue}  # tokens generated so far
    trace = Trace(per_request={r: [] for r in queue})
    while running:
        rows = torch.tensor(running)
        ks = torch.tensor([k[r] for r in running])
        B = len(running)
        lp, ids = ddtree.topk_marginals(req.logits[rows, ks - 1], K, 1.0)
        roots = req.greedy[rows, ks - 1]
        ctx = req.prompt_lens[rows] + ks - 1
        if policy.mode == "fixed":
            tree = ddtree.build_tree(lp, ids, roots, ctx, policy.budget)
        else:
            cost, draft_cost = source.row(policy.mode, B)
            tree = ddtree.build_tree(lp, ids, roots, ctx, CAP, cost, draft_cost, policy.mode)
        # The target's greedy token at a slot of depth d is g[k + d] when the slot's path is greedy; the
        # walk only ever reads slots whose path is greedy, so the others' values do not matter.
        target_tokens = req.greedy[rows[:, None], ks[:, None] + tree.depths.long()]
        accepted, accept_len, bonus = ddtree.accept_tree(tree.tokens, tree.parents, tree.num_nodes, target_tokens, D)
        a = accept_len.long()
        for i in range(B):  # the committed tokens are the greedy ones (root, accepted nodes, bonus)
            path = tree.tokens[i, accepted[i, : a[i]]]
            want = req.greedy[rows[i], ks[i] - 1: ks[i] - 1 + a[i]]
            assert torch.equal(path, want) and int(bonus[i]) == int(req.greedy[rows[i], ks[i] - 1 + a[i]])
        n = tree.num_nodes.long()
        trace.sizes.append(n.numpy().copy())
        trace.accepts.append(a.numpy().copy())
        trace.expected.append(tree.expected_tokens.double().numpy().copy())
        for r, ai, ni in zip(rows.tolist(), a.tolist(), n.tolist()):
            trace.per_request[r].append((ai, ni))
        trace.tokens += int((torch.clamp(ks + a, max=M) - ks).sum())
        for r, ai in zip(running, a.tolist()):
            k[r] += ai
        running = [r for r in running if k[r] < M]
        while len(running) < slots and pending:
            running.append(pending.pop(0))
    return trace


def price(trace: Trace, source: CostSource, verify: str) -> float:
    """Modelled time (ms) of a trace: per round Cd(B') + the padded or ragged verify of its trees."""
    total = 0.0
    for n in trace.sizes:
        B = len(n)
        v = source.padded(B, n.max()) if verify == "padded" else source.ragged(B, n.sum())
        total += source.draft(B) + float(np.asarray(v).reshape(-1)[0])
    return total


def run_batches(req: Requests, B: int, policy: Policy, source, schedule: str) -> list[Trace]:
    """``static``: the requests in groups of ``B``, each group one batch that shrinks as requests finish;
    ``refill``: one batch of ``B`` slots over the whole queue (continuous batching)."""
    R = len(req.prompts)
    if schedule == "refill":
        return [simulate(req, list(range(R)), policy, source, slots=B)]
    return [simulate(req, list(range(s, min(s + B, R))), policy, source) for s in range(0, R, B)]


def summarise(traces: list[Trace], source: CostSource, verify: str) -> dict:
    tokens = sum(t.tokens for t in traces)
    ms = sum(price(t, source, verify) for t in traces)
    sizes = np.concatenate([s for t in traces for s in t.sizes])
    accepts = np.concatenate([a for t in traces for a in t.accepts])
    expected = np.concatenate([e for t in traces for e in t.expected])
    return {"tokens": tokens, "model_ms": ms, "tokens_per_s": tokens / ms * 1e3, "mean_tree_size": float(sizes.mean()),
            "acceptance": float(accepts.mean()), "expected_acceptance": float(expected.mean()),
            "rounds": sum(len(t.sizes) for t in traces)}


# ---- the check against real generate runs --------------------------------------------------------------


class _RequestTable:
    """A cost model for generate's CaDDTree: every request priced by the source's batch-1 row."""

    def __init__(self, source: CostSource):
        self.source = source
        self.draft_cost = source.row("request", 1)[1]

    def table(self, context_lens, max_nodes, max_context=None):  # CostModel.table's signature
        row = self.source.row("request", 1)[0][0, : max_nodes + 1]
        return row.expand(len(context_lens), -1).to(context_lens.device)


def check_against_generate(target, drafter, req: Requests, count: int, source: CostSource) -> dict:
    """Per request and round, the simulation's (accepted length, tree size) against real generate runs of
    the first ``count`` prompts as one batch: DDTree at 64 nodes and per-request CaDDTree."""
    group = list(range(count))
    prompts = [req.prompts[r] for r in group]
    out = {}
    for policy, kw in ((Policy("fixed-64", "fixed", 64), dict(method="ddtree", max_nodes=64)),
                       (Policy("caddtree", "request"),
                        dict(method="caddtree", max_nodes=CAP, cost_model=_RequestTable(source)))):
        run = decode.generate(target, drafter, prompts, max_new_tokens=req.new_tokens, **kw)
        sim = simulate(req, group, policy, source)
        same_tokens = all(run.tokens[i] == req.greedy[r, : req.new_tokens].tolist() for i, r in enumerate(group))
        rounds = equal = 0
        for i, r in enumerate(group):
            real = [(a, n) for st in run.rounds for a, n in [(st.accept_len[i], st.tree_size[i])] if a > 0]
            simulated = sim.per_request[r]
            rounds += max(len(real), len(simulated))
            equal += sum(x == y for x, y in zip(real, simulated))
        out[policy.name] = {"rounds": rounds, "equal": equal, "greedy_tokens_match": same_tokens}
    return out


# ---- the whole run ----------------------------------------------------------------------------------


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tdir, ddir = demo.pretrained_pair()
    target = load_target(tdir)
    drafter = DFlashDrafter.from_pretrained(ddir, dtype=target.dtype)
    t0 = time.perf_counter()
    prompts = held_out_prompts(args.requests, args.seed)
    req = precompute(target, drafter, prompts, args.new_tokens)
    t_pre = time.perf_counter() - t0
    mean_ctx = int(req.prompt_lens.float().mean() + args.new_tokens / 2)
    sources = [a800_source()]
    t0 = time.perf_counter()
    sources.append(cpu_source(target, drafter, args.batch_sizes, mean_ctx, args.node_grid, args.repeats, args.passes))
    t_prof = time.perf_counter() - t0
    check = {s.name: check_against_generate(target, drafter, req, args.check_requests, s) for s in sources}

    t0 = time.perf_counter()
    table = {s.name: {} for s in sources}
    rounds = {s.name: {} for s in sources}  # per B and adaptive policy: per-round sizes, for the test
    for B in args.batch_sizes:
        for policy in policies():
            if policy.mode == "fixed":  # trees do not depend on the cost source
                traces = run_batches(req, B, policy, None, args.schedule)
            for s in sources:
                if policy.mode != "fixed":
                    traces = run_batches(req, B, policy, s, args.schedule)
                    rounds[s.name].setdefault(B, {})[policy.name] = [x.tolist() for t in traces for x in t.sizes]
                rows = table[s.name].setdefault(B, {})
                if policy.mode in ("fixed", "request"):
                    rows[policy.name] = summarise(traces, s, "padded")
                    rows[policy.name + "-ragged"] = summarise(traces, s, "ragged")
                else:
                    rows[policy.name] = summarise(traces, s, "padded" if policy.mode == "batch" else "ragged")
    t_sim = time.perf_counter() - t0
    gains = {s: {B: gain_summary(rows) for B, rows in by_b.items()} for s, by_b in table.items()}
    return {
        "command": args.command, "commit": _commit(), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"CPU, {torch.get_num_threads()} torch thread(s)",
        "requests": args.requests, "new_tokens": args.new_tokens, "check_requests": args.check_requests,
        "schedule": args.schedule, "batch_sizes": list(args.batch_sizes),
        "cap": CAP, "depth": req.depth, "mean_prompt_len": float(req.prompt_lens.float().mean()),
        "assumptions": {s.name: s.assumption for s in sources},
        "cpu_profile": {B: {"node_grid": m.node_grid, "verify_fit_ms": m.verify_ms[0].tolist(),
                            "draft_ms": m.draft_cost, **{k: m.measured[k] for k in ("verify_median_ms_per_pass",
                                                                                    "draft_median_ms_per_pass")}}
                        for B, m in sources[1].models.items()},
        "calibration": calibration(req),
        "check_against_generate": check, "table": table, "gains": gains, "rounds": rounds,
        "seconds": {"precompute": t_pre, "profile": t_prof, "simulate": t_sim},
    }


def gain_summary(rows: dict) -> dict:
    fixed = {f"fixed-{n}": rows[f"fixed-{n}"]["tokens_per_s"] for n in FIXED_BUDGETS}
    fixed_r = {f"fixed-{n}": rows[f"fixed-{n}-ragged"]["tokens_per_s"] for n in FIXED_BUDGETS}
    best, best_r = max(fixed, key=fixed.get), max(fixed_r, key=fixed_r.get)
    tps = lambda name: rows[name]["tokens_per_s"]  # noqa: E731
    return {
        "best_fixed_padded": best, "best_fixed_ragged": best_r,
        "batch_over_caddtree": tps("batch") / tps("caddtree"),
        "batch_over_best_fixed": tps("batch") / fixed[best],
        "ragged_over_caddtree_ragged": tps("ragged") / tps("caddtree-ragged"),
        "ragged_over_best_fixed_ragged": tps("ragged") / fixed_r[best_r],
        "ragged_over_caddtree": tps("ragged") / tps("caddtree"),
        "ragged_over_batch": tps("ragged") / tps("batch"),
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- output ------------------------------------------------------------------------------------------


def markdown(res: dict) -> str:
    checks = "; ".join(f"{s}/{p}: {c['equal']}/{c['rounds']} rounds equal, greedy text {c['greedy_tokens_match']}"
                       for s, runs in res["check_against_generate"].items() for p, c in runs.items())
    schedule = {"static": "static batches (groups of B; a finished request leaves)",
                "refill": "continuous batching (B slots; a queued request takes a finished one's slot)"}
    schedule = schedule[res["schedule"]]
    lines = [f"{res['requests']} held-out prompts (mean length {res['mean_prompt_len']:.0f}), {res['new_tokens']} new "
             f"tokens each, {schedule}, draft depth {res['depth']}, adaptive cap N = {res['cap']}. "
             f"Simulation against real "
             f"`generate` runs of {res['check_requests']} prompts: {checks}.", ""]
    for s, by_b in res["table"].items():
        Bs = list(by_b)
        first = by_b[Bs[0]]
        # Fixed budgets give every tree n nodes, so their ragged price equals the padded one: one row.
        same = all(math.isclose(by_b[B][f"{n}-ragged"]["model_ms"], by_b[B][n]["model_ms"], rel_tol=1e-12)
                   for B in Bs for n in first if n.startswith("fixed-") and not n.endswith("-ragged"))
        names = [n for n in first if not (same and n.startswith("fixed-") and n.endswith("-ragged"))]
        lines += [f"**{s}**: {res['assumptions'][s]}.", "",
                  "| policy (verify priced) | " + " | ".join(f"B={B} tok/s | n̄ | acc" for B in Bs) + " |",
                  "|---|" + "---:|---:|---:|" * len(Bs)]
        for name in names:
            cells = [f"{by_b[B][name]['tokens_per_s']:.1f} | {by_b[B][name]['mean_tree_size']:.1f} | "
                     f"{by_b[B][name]['acceptance']:.2f}" for B in Bs]
            lines.append(f"| {_label(name, same)} | " + " | ".join(cells) + " |")
        lines += ["", "| gain (ratio of tok/s) | " + " | ".join(f"B={B}" for B in Bs) + " |",
                  "|---|" + "---:|" * len(Bs)]
        g = res["gains"][s]
        for key in ("best_fixed_padded", "best_fixed_ragged"):
            lines.append(f"| {key} | " + " | ".join(g[B][key] for B in Bs) + " |")
        for key in ("batch_over_caddtree", "batch_over_best_fixed", "ragged_over_caddtree_ragged",
                    "ragged_over_best_fixed_ragged", "ragged_over_caddtree", "ragged_over_batch"):
            lines.append(f"| {key} | " + " | ".join(f"{g[B][key]:.3f}" for B in Bs) + " |")
        lines += ["", "| realised / expected acceptance | " + " | ".join(f"B={B}" for B in Bs) + " |",
                  "|---|" + "---:|" * len(Bs)]
        for name in ("caddtree", "batch", "ragged"):
            lines.append(f"| {name} | " + " | ".join(
                f"{by_b[B][name]['acceptance']:.2f} / {by_b[B][name]['expected_acceptance']:.2f}" for B in Bs) + " |")
        lines.append("")
    lines += ["Drafter calibration (every node of the 64-node trees at every round start): path probability p "
              "against how often the node's path is the greedy one.", "",
              "| p | nodes | mean p | hit rate | hit / p |", "|---|---:|---:|---:|---:|"]
    for c in res["calibration"]:
        lines.append(f"| [{c['p_from']:g}, {c['p_to']:g}) | {c['nodes']} | {c['mean_p']:.4f} | {c['hit_rate']:.4f} | "
                     f"{c['hit_rate'] / c['mean_p']:.2f} |")
    lines += ["", "CPU profile (ms; fitted Cv at n = 0, 8, 64 and the draft round; the spread is the largest over "
              "the smallest pass median at any n):", "", "| B | Cv(0) | Cv(8) | Cv(64) | Cd | pass spread |",
              "|---:|---:|---:|---:|---:|---:|"]
    for B, c in res["cpu_profile"].items():
        grid, fit, per_pass = c["node_grid"], c["verify_fit_ms"], np.array(c["verify_median_ms_per_pass"])
        at = lambda n: fit[grid.index(n)] if n in grid else float("nan")  # noqa: E731
        spread = float((per_pass.max(0) / per_pass.min(0)).max())
        lines.append(f"| {B} | {at(0):.2f} | {at(8):.2f} | {at(64):.2f} | {c['draft_ms']:.2f} | {spread:.2f} |")
    return "\n".join(lines)


def _label(name: str, fixed_merged: bool) -> str:
    if name.startswith("fixed-"):
        return name.replace("-ragged", " (ragged)") if name.endswith("-ragged") else \
            name + (" (padded = ragged)" if fixed_merged else " (padded)")
    return {"caddtree": "per-request CaDDTree (padded)", "caddtree-ragged": "per-request CaDDTree (ragged)",
            "batch": "batch mode (padded)", "ragged": "ragged mode (ragged)"}[name]


def plot(res: dict, path: Path) -> Path:
    """Top: tokens per modelled second against B; bottom: the same over the best fixed budget in hindsight
    (under the same pricing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(res["table"])
    fig, axes = plt.subplots(2, len(sources), figsize=(6.0 * len(sources), 8.0), squeeze=False)
    for col, s in enumerate(sources):
        by_b, g = res["table"][s], res["gains"][s]
        Bs = list(by_b)
        best = {"padded": [by_b[B][g[B]["best_fixed_padded"]]["tokens_per_s"] for B in Bs],
                "ragged": [by_b[B][g[B]["best_fixed_ragged"] + "-ragged"]["tokens_per_s"] for B in Bs]}
        series = [("best fixed budget in hindsight", "padded", lambda B: by_b[B][g[B]["best_fixed_padded"]], "k:", "o"),
                  ("per-request CaDDTree (padded)", "padded", lambda B: by_b[B]["caddtree"], "C0--", "o"),
                  ("per-request CaDDTree (ragged-priced)", "ragged", lambda B: by_b[B]["caddtree-ragged"], "C1--", "s"),
                  ("batch mode (padded)", "padded", lambda B: by_b[B]["batch"], "C2-", "o"),
                  ("ragged mode (ragged)", "ragged", lambda B: by_b[B]["ragged"], "C3-", "s")]
        for label, pricing, row, style, marker in series:
            ys = [row(B)["tokens_per_s"] for B in Bs]
            axes[0, col].plot(Bs, ys, style, marker=marker, label=label)
            axes[1, col].plot(Bs, [y / b for y, b in zip(ys, best[pricing])], style, marker=marker,
                              label=f"{label} / best fixed ({pricing})")
        for row_ax, ylabel in ((axes[0, col], "tokens per second of modelled time"),
                               (axes[1, col], "ratio to the best fixed budget, same pricing")):
            row_ax.set_xscale("log", base=2)
            row_ax.set_xticks(Bs, [str(B) for B in Bs])
            row_ax.set_xlabel("batch size B")
            row_ax.set_ylabel(ylabel)
            row_ax.grid(alpha=0.3)
            row_ax.legend(fontsize=7)
        axes[0, col].set_yscale("log")
        axes[0, col].set_title(f"cost source: {s}")
    fig.suptitle("greedy decoding, shipped stdlib-char pair, held-out prompts (exact simulation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md and the plot")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 requests, 24 tokens, B in {1, 4}")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--check-requests", type=int, default=8, help="prompts run through real generate as a check")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per profiled point")
    p.add_argument("--passes", type=int, default=3, help="profile passes per batch size (least median kept)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", choices=("static", "refill"), default="static",
                   help="static: groups of B that shrink as requests finish; refill: B slots, queued requests "
                        "take the place of finished ones")
    args = p.parse_args(argv)
    args.batch_sizes = BATCH_SIZES
    args.node_grid = [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    if args.quick:
        args.requests, args.new_tokens, args.check_requests, args.repeats, args.passes = 8, 24, 4, 2, 1
        args.batch_sizes, args.node_grid = (1, 4), [0, 1, 2, 4, 8, 16, 32, 64]
    if max(args.batch_sizes) > args.requests:
        p.error("--requests must be at least the largest batch size")
    args.command = "PYTHONPATH=python python bench/bench_batch_budget.py " + " ".join(argv if argv is not None else
                                                                                     __import__("sys").argv[1:])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (args.out / "results.md").write_text(md + "\n")
    png = plot(res, args.out / "throughput_vs_batch.png")
    print(json.dumps(res["check_against_generate"]))
    print(md)
    print(f"seconds: {res['seconds']}; wrote {args.out / 'results.json'}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
