"""End-to-end decoding benchmark: AR, DFlash chain, DDTree at fixed budgets, CaDDTree, and the published
reference pipeline running CaDDTree, all in one run.

COSTS ARE REAL, ACCEPTANCE IS SIMULATED. The target (a Qwen3-8B-shaped model with random weights on
GPU; a tiny one with --small) and the DFlash drafter (random weights, real shape) run their real
forwards, and every op of a round runs for real (topk_marginals, build_tree, verify, argmax,
accept_tree, compact_kv). Random weights cannot agree with each other, so the drafter's marginals and
the target's choices are replaced by a calibrated oracle: per round and depth the marginal is a
distribution over ranks (top-1 probability ``sigmoid(mu0 - delta*(i-1) + sigma*z_round)``, the rest
geometric in the rank with ratio ``g``), and the target's true next token sits at a rank drawn from that
same distribution. ``mu0`` and ``g`` are found by bisection, in simulation on CPU, so that the DFlash
chain's acceptance length is 7.8 and DDTree's at 256 nodes is 10.7 (the published Qwen3-8B MATH-500
figures, temperature 0).

Every method runs through the shipped decode loop, ``ddtree.decode.generate``, with its one host
synchronisation per round: ``OracleDrafter`` and ``OracleTarget`` wrap the real drafter and fast target,
whose forwards run for real before their outputs are overwritten with the oracle's marginals and choices.

Reports: tokens/s per method; CaDDTree against the best fixed budget in hindsight; CaDDTree against the
reference pipeline (HF forward with a dense tree mask over a DynamicCache, torch.topk + Python heap
build, Python accept walk, per-layer cache compaction) running CaDDTree, target >= 4x; the time outside
the two model forwards as a share of a round, target <= 5%.

    python3 bench/bench_e2e.py --small                 # tiny model on CPU, a minute or two
    python3 bench/bench_e2e.py --out out/e2e           # GPU: the full run, JSON + plots
    python3 bench/bench_e2e.py --verify-only           # GPU: verify forward vs weight-read floor vs HF
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import use_checkout_if_built  # noqa: E402

use_checkout_if_built()  # the checkout's ddtree if it is built, else the installed one
import ddtree  # noqa: E402
from ddtree.cost import profile  # noqa: E402
from ddtree.decode import generate  # noqa: E402
from ddtree.fast_target import FastTarget  # noqa: E402
from ddtree.timing import device_name, measure_rates, median_ms, wall_ms  # noqa: E402

from reference_pipeline import ReferencePipeline, profile_reference, run_reference  # noqa: E402

BUDGETS = (16, 32, 64, 128, 256, 512, 1024)
PUBLISHED = {"dflash_chain": 7.8, "ddtree_256": 10.7}  # Qwen3-8B, MATH-500, temperature 0


# --------------------------------------------------------------------------------------------------
# Models


def target_config(small: bool):
    """Qwen3-8B's shape, or a tiny one for CPU smoke runs."""
    from transformers import Qwen3Config

    if small:
        return Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                           initializer_range=0.2, tie_word_embeddings=False)
    return Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def make_models(small: bool, device, dtype, seed: int = 0):
    """(HF model, FastTarget over the same weights, DFlash drafter) with random weights."""
    from transformers import AutoModelForCausalLM

    from ddtree.drafter import DFlashConfig, DFlashDrafter

    cfg = target_config(small)
    draft_layers = 1 if small else 5  # 5: the published DFlash drafter for Qwen3-8B
    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()
    fast = FastTarget.from_model(hf)
    dcfg = DFlashConfig.for_target(cfg, num_layers=draft_layers, block_size=16, mask_token_id=cfg.vocab_size - 1)
    with torch.device(device):
        drafter = DFlashDrafter(dcfg).to(dtype).eval()
    return hf, fast, drafter


# --------------------------------------------------------------------------------------------------
# The calibrated oracle


@dataclass
class Oracle:
    """Drafter marginals over ranks and the target's true ranks, per round (see the module doc)."""

    depth: int = 15  # D
    k: int = 8  # candidates per depth
    delta: float = 0.1  # top-1 logit drop per depth
    sigma: float = 1.0  # spread of a round's difficulty
    mu0: float = 2.0
    g: float = 0.3

    def marginals(self, z: torch.Tensor) -> torch.Tensor:
        """z ``[R]`` round difficulties -> probabilities ``[R, D, K]`` f64, sorted descending, rows sum to 1."""
        i = torch.arange(self.depth, dtype=torch.float64)
        top1 = torch.sigmoid(self.mu0 - self.delta * i[None] + self.sigma * z[:, None].double())  # [R, D]
        ranks = torch.arange(1, self.k, dtype=torch.float64)
        tail = (1 - self.g) * self.g ** (ranks - 1) / (1 - self.g ** (self.k - 1))  # [K-1], sums to 1
        p = torch.cat([top1[..., None], (1 - top1)[..., None] * tail], dim=-1)
        return p.sort(dim=-1, descending=True).values

    def rounds(self, R: int, vocab: int, seed: int):
        """R rounds: logprobs ``[R, D, K]`` f32, token_ids ``[R, D, K]`` i64 (distinct per depth), true tokens
        ``[R, D+1]`` i64 (column i: the target's token after depth i; the last one is the bonus after a
        full-depth accept)."""
        g = torch.Generator().manual_seed(seed)
        p = self.marginals(torch.randn(R, generator=g))
        true_rank = torch.multinomial(p.flatten(0, 1).float(), 1, generator=g).view(R, self.depth)
        ids = (torch.arange(self.k)[None, None] + 1 + 7 * torch.arange(self.depth)[None, :, None]) % vocab
        ids = ids.expand(R, -1, -1).contiguous()
        true = torch.cat([ids.gather(2, true_rank[..., None])[..., 0], torch.ones(R, 1, dtype=torch.long)], 1)
        return p.log().float(), ids, true

    def expected(self, R: int, budget: int, chain: bool, seed: int = 0) -> float:
        """Mean expected acceptance length (1 + Phi) of a chain or a DDTree of ``budget`` nodes."""
        lp, ids, _ = self.rounds(R, 1 << 20, seed)
        if chain:
            lp, ids, budget = lp[..., :1], ids[..., :1], self.depth
        tree = ddtree.build_tree(lp, ids, torch.zeros(R, dtype=torch.long), torch.zeros(R, dtype=torch.long), budget)
        return float(tree.expected_tokens.mean())


def _bisect(f, lo, hi, target, increasing, iters=30):
    for _ in range(iters):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def calibrate(oracle: Oracle, R: int = 1024) -> dict:
    """Fit mu0 (chain acceptance, independent of g) then g (DDTree-256 acceptance, decreasing in g)."""
    def chain(mu0):
        oracle.mu0 = mu0
        return oracle.expected(R, 0, chain=True)

    oracle.mu0 = _bisect(chain, -2.0, 12.0, PUBLISHED["dflash_chain"], increasing=True)

    def tree(g):
        oracle.g = g
        return oracle.expected(R, 256, chain=False)

    oracle.g = _bisect(tree, 0.01, 0.99, PUBLISHED["ddtree_256"], increasing=False, iters=20)
    got = {"dflash_chain": oracle.expected(R, 0, True), "ddtree_256": oracle.expected(R, 256, False)}
    return {"mu0": oracle.mu0, "g": oracle.g, "delta": oracle.delta, "sigma": oracle.sigma, "k": oracle.k,
            "expected_acceptance": got, "published": PUBLISHED}


# --------------------------------------------------------------------------------------------------
# The shipped decode loop, with the oracle standing in for what random weights cannot do


class OracleDrafter:
    """The real drafter, its marginals replaced by the oracle's. Its forward runs for real; then the
    logits are -inf outside the round's K candidates per depth and the oracle's log-probabilities on them,
    so ``topk_marginals`` (which still reads all ``[B, D, V]``) returns the oracle's marginals."""

    def __init__(self, inner, logprobs: torch.Tensor, token_ids: torch.Tensor):
        self.inner, self.logprobs, self.token_ids = inner, logprobs, token_ids  # [R, D, K] on the device
        self.block_size, self.target_layer_ids = inner.block_size, inner.target_layer_ids
        self.round = 0

    def reset(self, batch_size: int, max_len: int) -> None:
        self.inner.reset(batch_size, max_len)
        self.round = 0

    def draft(self, target, root_tokens, features, lengths):
        logits = self.inner.draft(target, root_tokens, features, lengths)  # [B, D, V] f32, a fresh tensor
        r, B = min(self.round, len(self.logprobs) - 1), logits.shape[0]
        self.round += 1
        return logits.fill_(float("-inf")).scatter_(2, self.token_ids[r].expand(B, -1, -1),
                                                    self.logprobs[r].expand(B, -1, -1))


class OracleTarget:
    """The fast target, its choices following the oracle. Its verify forward runs for real; then each
    slot's logits get +inf at the oracle's true token after that slot's depth, so greedy sampling (which
    still reads all ``[B, T, V]``) picks it. Everything else is the fast target's own."""

    def __init__(self, inner: FastTarget, true_tokens: torch.Tensor):
        self.inner, self.true_tokens = inner, true_tokens  # [R, D + 1] on the device
        self.round = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def reset(self, batch_size: int, max_len: int) -> None:
        self.inner.reset(batch_size, max_len)
        self.round = 0

    def verify(self, tree):
        logits, feats = self.inner.verify(tree)
        r = min(self.round, len(self.true_tokens) - 1)
        self.round += 1
        choice = self.true_tokens[r][tree.depths.long()]  # [B, T]
        return logits.scatter_(2, choice[..., None], float("inf")), feats


def run_method(method, budget, target: OracleTarget, drafter: OracleDrafter, prompt: list[int], new_tokens: int,
               cost_model) -> dict:
    """``ddtree.decode.generate`` itself: ``new_tokens`` after ``prompt`` with ``method`` (``budget`` nodes
    for ddtree; the largest budget is the CaDDTree cap). Decode time excludes the prefill."""
    out = generate(target, drafter, [prompt], method=method, max_new_tokens=new_tokens,
                   max_nodes=budget or max(BUDGETS), cost_model=cost_model)
    seconds = out.total_s - out.prefill_s
    tokens = len(out.tokens[0]) - 1  # the first token is the prefill's
    draft_s, verify_s = sum(r.draft_s for r in out.rounds), sum(r.verify_s for r in out.rounds)
    return {"method": method, "budget": budget, "tokens": tokens, "rounds": len(out.rounds), "seconds": seconds,
            "tokens_per_s": tokens / seconds, "acceptance": out.acceptance_length,
            "budgets": [n for r in out.rounds for n in r.tree_size],
            "draft_s": draft_s, "verify_s": verify_s, "other_share": max(0.0, 1 - (draft_s + verify_s) / seconds)}


# --------------------------------------------------------------------------------------------------
# Verify-only: the fast verify forward against the weight-read floor and the HF path


@torch.inference_mode()  # the runner's caches are inference tensors (FastTarget.reset makes them so)
def verify_only(hf, fast: FastTarget, device, context: int, sizes=(1, 16, 32, 64, 128)) -> dict:
    s = fast.shape
    weight_bytes = sum(t.numel() * t.element_size() for L in fast.layers for t in L.values() if t is not None)
    weight_bytes += fast.lm_head_weight.numel() * fast.lm_head_weight.element_size()
    kv_bytes = 2 * s.layers * s.kv_heads * s.head_dim * context * fast.embed_weight.element_size()
    bw = measure_rates(device)["bandwidth_gbs"] * 1e9  # bytes/s
    floor_ms = (weight_bytes + kv_bytes) / bw * 1e3
    fast.set_feature_layers([])
    fast.reset(1, context + 1024 + 8)
    fast.context_lens.fill_(context)
    ref = ReferencePipeline(hf, [], None)
    ref.prefill(torch.randint(0, s.vocab, (1, context), device=device))
    rows = []
    for T in sizes:
        lp, ids = torch.full((1, 15, 8), -0.1), torch.arange(8).repeat(1, 15, 1)
        tree = ddtree.build_tree(lp, ids, torch.zeros(1, dtype=torch.long), torch.tensor([context]), T - 1).to(device)
        fast_ms = median_ms(lambda: fast.verify(tree), device, timer=wall_ms)
        host = (tree.tokens[0].tolist(), tree.parents[0].tolist(), tree.depths[0].tolist())

        def hf_once():
            ref.verify(*host)
            ref.truncate(context)
        hf_ms = median_ms(hf_once, device, warmup=2, repeats=5, timer=wall_ms)
        rows.append({"slots": T, "fast_ms": fast_ms, "hf_ms": hf_ms, "floor_ms": floor_ms,
                     "fast_over_floor": fast_ms / floor_ms, "hf_over_fast": hf_ms / fast_ms})
    # AR per token: a whole round with an empty tree (build, verify, argmax, accept, commit)
    fast.context_lens.fill_(context)
    z = torch.zeros(1, 1, 1, device=device)

    def ar_round():
        tree = ddtree.build_tree(z, z.long(), torch.zeros(1, dtype=torch.long, device=device), fast.context_lens, 0)
        lg, _ = fast.verify(tree)
        acc, alen, _ = ddtree.accept_tree(tree.tokens, tree.parents, tree.num_nodes, lg.argmax(-1), 0)
        fast.commit(acc, alen * 0)  # commit nothing: the context stays at `context`
    ar_ms = median_ms(ar_round, device, timer=wall_ms)
    print(f"\nverify forward at context {context} ({device_name(device)}, weight+KV read floor {floor_ms:.2f} ms "
          f"at {bw / 1e9:.0f} GB/s measured copy bandwidth):")
    print(f"{'slots':>6} {'fast ms':>9} {'HF ms':>9} {'floor ms':>9} {'fast/floor':>11} {'HF/fast':>8}")
    for r in rows:
        print(f"{r['slots']:>6} {r['fast_ms']:>9.3f} {r['hf_ms']:>9.3f} {r['floor_ms']:>9.3f} "
              f"{r['fast_over_floor']:>11.2f} {r['hf_over_fast']:>8.1f}")
    print(f"AR round per token: {ar_ms:.3f} ms = {ar_ms / floor_ms:.2f}x floor (target <= 1.3x for T <= 128)")
    return {"context": context, "bandwidth_GBps": bw / 1e9, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
            "rows": rows, "ar_round_ms": ar_ms}


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny model on CPU in seconds (smoke test)")
    ap.add_argument("--verify-only", action="store_true", help="only the verify forward vs floor and HF")
    ap.add_argument("--out", type=Path, help="folder for results.json and the plots")
    ap.add_argument("--context", type=int, help="prompt length (default 1024; 64 with --small)")
    ap.add_argument("--new-tokens", type=int, help="tokens to generate per method (default 512; 64 with --small)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.small or not torch.cuda.is_available() else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    context = args.context or (64 if args.small else 1024)
    new_tokens = args.new_tokens or (64 if args.small else 512)
    torch.manual_seed(args.seed)
    hf, fast, drafter = make_models(args.small, device, dtype, args.seed)
    print(f"device {device_name(device)}; target {fast.num_hidden_layers} layers, hidden {fast.hidden_size}, "
          f"vocab {fast.vocab_size}, {dtype}; drafter {len(drafter.layers)} layers, block {drafter.block_size}")
    results = {"device": device_name(device), "dtype": str(dtype), "small": args.small, "context": context,
               "new_tokens": new_tokens, "torch": torch.__version__}
    if args.verify_only:
        results["verify_only"] = verify_only(hf, fast, device, args.context or (256 if args.small else 4096))
        return _save(results, args.out)

    oracle = Oracle(depth=drafter.block_size - 1)
    t = time.perf_counter()
    results["oracle"] = calibrate(oracle)
    got = results["oracle"]["expected_acceptance"]
    print(f"oracle calibrated in {time.perf_counter() - t:.1f}s: mu0 {oracle.mu0:.3f} g {oracle.g:.3f} -> expected "
          f"acceptance chain {got['dflash_chain']:.2f} (published 7.8), DDTree-256 {got['ddtree_256']:.2f} (10.7)")
    rounds = [t.to(device) for t in oracle.rounds(new_tokens + 1, fast.vocab_size, args.seed + 1)]
    prompt = torch.randint(0, fast.vocab_size, (1, context), device=device)
    oracle_target, oracle_drafter = OracleTarget(fast, rounds[2]), OracleDrafter(drafter, rounds[0], rounds[1])

    # Cost models: the fast runner through ddtree.cost.profile, the reference through the same fit
    contexts = [context, context + new_tokens]
    fast.set_feature_layers(list(drafter.target_layer_ids))
    drafter.reset(1, context + 64)
    x0 = torch.zeros(1, dtype=torch.long, device=device)
    f0 = torch.zeros(1, 1, fast.hidden_size * len(drafter.target_layer_ids), dtype=dtype, device=device)
    draft_round = lambda: drafter.draft(fast, x0, f0, torch.zeros(1, dtype=torch.long, device=device))  # noqa: E731
    grid = [0, 1, 2, 4, 8, 15, 16, 24, 31, 32, 48, 63, 64, 96, 127, 128, 192, 255, 256, 384, 511, 512, 768, 1023, 1024]
    t = time.perf_counter()
    cost_fast = profile(fast, draft_round, max_nodes=max(BUDGETS), contexts=contexts, node_grid=grid,
                        warmup=2, repeats=5, progress=False)
    ref = ReferencePipeline(hf, drafter.target_layer_ids, None)
    ref.cost = profile_reference(ref, contexts, [0, 16, 64, 256, 1024], device, fast.vocab_size, cost_fast.draft_cost)
    print(f"profiled Cv in {time.perf_counter() - t:.1f}s; Cd {cost_fast.draft_cost:.3f} ms")
    results["cost"] = {"fast": {"node_grid": cost_fast.node_grid, "contexts": cost_fast.contexts,
                                "verify_ms": cost_fast.verify_ms.tolist(), "measured": cost_fast.measured,
                                "draft_ms": cost_fast.draft_cost},
                       "reference": {"node_grid": ref.cost.node_grid, "contexts": ref.cost.contexts,
                                     "verify_ms": ref.cost.verify_ms.tolist()}}

    methods = [("ar", None), ("dflash", None)] + [("ddtree", b) for b in BUDGETS] + [("caddtree", None)]
    # Caches sized once for the longest run: generate's resets then keep them, and with them the verify
    # graphs captured during each method's warm-up.
    fast.reset(1, context + new_tokens + 2 * drafter.block_size + max(BUDGETS) + 2)
    runs, prompt_ids = [], prompt[0].tolist()
    for m, b in methods:
        run_method(m, b, oracle_target, oracle_drafter, prompt_ids, min(new_tokens, 32), cost_fast)  # warm-up
        runs.append(run_method(m, b, oracle_target, oracle_drafter, prompt_ids, new_tokens, cost_fast))
        _print_run(runs[-1])
    run_reference(ref, drafter, rounds, prompt, min(new_tokens, 16), max(BUDGETS), device)  # warm-up
    runs.append(run_reference(ref, drafter, rounds, prompt, new_tokens, max(BUDGETS), device))
    _print_run(runs[-1])
    results["runs"] = runs

    by = {(r["method"], r["budget"]): r for r in runs}
    cad, refr = by[("caddtree", None)], by[("reference_caddtree", None)]
    best = max((r for r in runs if r["method"] == "ddtree"), key=lambda r: r["tokens_per_s"])
    summary = {
        "caddtree_over_best_fixed": cad["tokens_per_s"] / best["tokens_per_s"], "best_fixed_budget": best["budget"],
        "caddtree_over_reference": cad["tokens_per_s"] / refr["tokens_per_s"],
        "caddtree_other_share": cad["other_share"],
    }
    results["summary"] = summary
    print("\nACCEPTANCE IS SIMULATED (calibrated oracle); COSTS ARE REAL (forwards and ops on "
          f"{device_name(device)}).")
    print(f"CaDDTree vs best fixed budget in hindsight (DDTree-{best['budget']}): "
          f"{summary['caddtree_over_best_fixed']:.2f}x")
    print(f"CaDDTree vs the reference pipeline running CaDDTree: {summary['caddtree_over_reference']:.2f}x (target >= 4x)")
    print(f"time outside the two model forwards, CaDDTree: {100 * cad['other_share']:.1f}% of a round (target <= 5%)")
    _save(results, args.out)


def _print_run(r):
    name = r["method"] + (f"-{r['budget']}" if r["budget"] else "")
    print(f"{name:>20}: {r['tokens_per_s']:9.1f} tok/s  acceptance {r['acceptance']:5.2f}  "
          f"mean tree {statistics.mean(r['budgets']):7.1f}  rounds {r['rounds']:4d}  "
          f"draft {r['draft_s'] * 1e3 / r['rounds']:.2f} ms/round  verify {r['verify_s'] * 1e3 / r['rounds']:.2f} "
          f"ms/round  other {100 * r['other_share']:.1f}%")


def _save(results, out):
    if out is None:
        return results
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'}")
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import plots

        for p in plots.plot_all(results, out):
            print(f"wrote {p}")
    except ImportError as e:
        print(f"plots skipped ({e})")
    return results


if __name__ == "__main__":
    main()
