"""CPU end-to-end benchmark: a Qwen3-0.6B-shaped target with random weights and its DFlash-shaped drafter,
every method through ``ddtree.decode.generate`` side by side with transformers' own ``generate``.

COSTS ARE REAL, ACCEPTANCE IS SIMULATED, exactly as in ``bench_e2e.py`` (whose calibrated oracle and
oracle wrappers this reuses): the target (hidden 1024, 28 layers, 16/8 heads, head dim 128, vocab 151936,
tied embeddings) and the drafter run their real forwards on the CPU; the drafter's marginals and the target's
choices then follow the oracle calibrated to the published DFlash/DDTree acceptance. Each dtype gets its own
section (default: bfloat16, Qwen3's own dtype, and float32 where this CPU has bf16 matrix units; float32
alone elsewhere), transformers running in the same dtype.

One run: the cost model measured here by ``ddtree.cost.profile`` (a coarse grid), then AR (ours, the
fast runner), transformers ``generate`` (greedy, static cache if it works on CPU, else dynamic; the
faster one is reported), DFlash, DDTree at budgets 4..256 and CaDDTree (cap 256). Decode tokens/s
exclude the prefill for every method. Goals: CaDDTree >= 0.95x the best fixed budget in hindsight and
>= 2x transformers ``generate``.

    python3 bench/bench_cpu_e2e.py --out out/cpu_e2e      # the full run, about 15 minutes on 2 cores
    python3 bench/bench_cpu_e2e.py --quick                # a tiny model, seconds (smoke test)

``--real``: REAL ACCEPTANCE AND REAL COSTS, NOT A REAL MODEL. The target is the shipped character-level
target scaled to cost like Qwen3-0.6B (``ddtree scale-target --like qwen3-0.6b``, or ``--scaled DIR``; its
logits are the shipped target's bit for bit) and the drafter is a real trained one (the shipped block-8
drafter, or ``--drafter DIR``), drafting continuations of held-out Python standard-library text. Methods:
AR (ours and transformers ``generate``), DFlash, DDTree at 8..256, CaDDTree per request, and CaDDTree's
batch and ragged budget modes at batch 4 and 16, with costs profiled here (batch sizes 1, 4, 16).

    python3 bench/bench_cpu_e2e.py --real --out out/cpu_e2e_real
    python3 bench/bench_cpu_e2e.py --real --quick        # a small scaled target, seconds (smoke test)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import Oracle, OracleDrafter, OracleTarget, calibrate, run_method  # noqa: E402

from ddtree import decode, train  # noqa: E402  (bench_e2e put python/ on the path)
from ddtree import scaled_target as st  # noqa: E402
from ddtree.cost import profile  # noqa: E402
from ddtree.demo import pretrained_pair  # noqa: E402
from ddtree.drafter import DFlashConfig, DFlashDrafter  # noqa: E402
from ddtree.fast_target import FastTarget  # noqa: E402
from ddtree.threads import SMALL_MODEL_PARAMS  # noqa: E402
from ddtree.timing import device_name, measure_rates  # noqa: E402

BUDGETS = (4, 8, 16, 32, 64, 128, 256)
DRAFT_LAYERS = 5  # the published DFlash drafters' depth
REAL_BUDGETS = (8, 16, 32, 64, 128, 256)  # --real: DDTree's fixed budgets and CaDDTree's cap
# Every node count up to 4, then 2-3 points per octave: small trees' costs are not linear in n here (on this
# AVX2 CPU at the 0.6B scale, fp32: 1 node 471 ms against 302 for none and 606 for 4, so a grid of 0, 4, 8
# read 1-2 node trees ~25% cheap and CaDDTree chose them).
PROFILE_GRID = [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256]
REAL_BATCHES = (4, 16)  # --real: batch sizes of CaDDTree's batch and ragged budget modes
QUICK_SHAPE = st.ScaledShape(layers=6, heads=4, kv_heads=2, intermediate_size=1024)  # --real --quick


def target_config(quick: bool):
    """Qwen3-0.6B's shape (tied embeddings, as released), or a tiny one for --quick."""
    from transformers import Qwen3Config

    if quick:
        return Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                           initializer_range=0.2, tie_word_embeddings=True)
    return Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def make_models(quick: bool, seed: int, dtype):
    from transformers import AutoModelForCausalLM

    cfg = target_config(quick)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()
    fast = FastTarget.from_model(hf)
    dcfg = DFlashConfig.for_target(cfg, num_layers=1 if quick else DRAFT_LAYERS, block_size=16,
                                   mask_token_id=cfg.vocab_size - 1)
    drafter = DFlashDrafter(dcfg).to(dtype).eval()
    return hf, fast, drafter


class _StepClock:
    """A stopping criterion that never stops: it records when each generated token is ready."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@torch.inference_mode()
def hf_generate(hf, prompt: torch.Tensor, new_tokens: int, cache: str) -> dict:
    """transformers ``generate``, greedy, ``new_tokens`` forced (no EOS stop). Decode tokens/s from the
    time between the first generated token (the prefill's) and the last, as for our methods."""
    from transformers import StoppingCriteriaList

    def run(n):
        clock = _StepClock()
        out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          eos_token_id=None, cache_implementation=cache, stopping_criteria=StoppingCriteriaList([clock]))
        assert out.shape[1] == prompt.shape[1] + n and len(clock.times) == n
        return clock.times

    times = run(new_tokens)
    tokens = new_tokens - 1
    return {"method": f"transformers ({cache} cache)", "budget": None, "tokens": tokens, "seconds": times[-1] - times[0],
            "tokens_per_s": tokens / (times[-1] - times[0]), "acceptance": 1.0, "budgets": [0], "rounds": tokens}


def transformers_methods(hf, prompt) -> dict:
    """transformers' own greedy ``generate`` with each KV cache that runs on this CPU (static, dynamic), by
    name: ``{name: once(new_tokens)}``; a cache that fails is reported and left out."""
    methods = {}
    for cache in ("static", "dynamic"):
        try:
            hf_generate(hf, prompt, 4, cache)
        except Exception as e:  # noqa: BLE001 - a cache transformers cannot run on CPU is reported, not fatal
            print(f"transformers generate with a {cache} cache failed on CPU: {type(e).__name__}: {e}")
            continue
        methods[f"transformers ({cache} cache)"] = lambda n, cache=cache: hf_generate(hf, prompt, n, cache)
    return methods


def default_dtypes() -> list[str]:
    """bfloat16 (Qwen3's own dtype) and float32 where this CPU multiplies bf16 at least as fast as fp32
    (matrix units: AMX, AVX512-BF16; measured, not guessed from flags), else float32 alone: a bf16 run
    on a CPU that emulates bf16 would take long and say nothing new."""
    bf16 = measure_rates("cpu", torch.bfloat16)["matmul_tflops"]
    fp32 = measure_rates("cpu", torch.float32)["matmul_tflops"]
    return ["bfloat16", "float32"] if bf16 >= fp32 else ["float32"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model, seconds: a smoke test of the whole run")
    ap.add_argument("--out", type=Path, help="folder for results.json and tokens_per_s_vs_budget.png")
    ap.add_argument("--context", type=int, default=None, help="prompt length (default 128; 32 with --quick)")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="tokens per method and pass (default 128: long enough that a few more or fewer tokens "
                         "in one round do not decide the round count)")
    ap.add_argument("--repeats", type=int, default=3, help="profile repeats per grid point")
    ap.add_argument("--passes", type=int, default=2, help="timed passes over every method (medians reported)")
    ap.add_argument("--dtype", default="auto",
                    help="weights and activations, one or a comma list of float32, bfloat16 (default auto: "
                         "both where this CPU has bf16 matrix units, else float32); each gets its own section")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", action="store_true",
                    help="real acceptance: the shipped drafter on the shipped target scaled to cost like Qwen3-0.6B")
    ap.add_argument("--scaled", type=Path, help="with --real: a `ddtree scale-target` folder (default: written to "
                                                "a temporary folder, --like qwen3-0.6b, or a small shape with --quick)")
    ap.add_argument("--drafter", type=Path, help="with --real: the drafter folder (default: the shipped block-8 one)")
    ap.add_argument("--batches", default=",".join(map(str, REAL_BATCHES)),
                    help="with --real: batch sizes of CaDDTree's batch and ragged modes, comma-separated, or none "
                         "(default 4,16; at the 0.6B scale on a 2-core CPU fp32 the batch-16 profile alone takes "
                         "about half an hour)")
    args = ap.parse_args(argv)
    if (args.scaled or args.drafter) and not args.real:
        ap.error("argument --scaled/--drafter: only --real runs a scaled target and a trained drafter")
    try:
        args.batches = [] if args.batches in ("", "none") else sorted({int(b) for b in args.batches.split(",")})
    except ValueError:
        ap.error(f"argument --batches: expected comma-separated batch sizes or none, got {args.batches!r}")
    if any(b < 2 for b in args.batches):
        ap.error(f"argument --batches: batch sizes are 2 or more (batch 1 is always run), got {args.batches}")
    dtypes = default_dtypes() if args.dtype == "auto" else args.dtype.split(",")
    if not dtypes or any(d not in ("float32", "bfloat16") for d in dtypes):
        ap.error(f"argument --dtype: expected auto or a comma list of float32, bfloat16, got {args.dtype!r}")
    if args.dtype != "auto" and "bfloat16" in dtypes and not args.quick:
        bf16, fp32 = (measure_rates("cpu", d)["matmul_tflops"] for d in (torch.bfloat16, torch.float32))
        if bf16 < fp32:  # one line: what forcing bf16 on this CPU costs
            print(f"warning: this CPU multiplies bfloat16 at {fp32 / bf16:.1f}x less than float32 (no bf16 matrix "
                  f"units: {device_name(torch.device('cpu'))}); the bfloat16 section will take that much longer")
    context = args.context or (32 if args.quick else 128)
    new_tokens = args.new_tokens or 128
    t_start = time.perf_counter()
    results = {"device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "quick": args.quick,
               "context": context, "new_tokens": new_tokens, "torch": torch.__version__, "real": args.real,
               "dtypes": {}}
    for name in dtypes:
        print(f"\n== {name} ==")
        run = bench_real if args.real else bench_dtype
        results["dtypes"][name] = run(args, getattr(torch, name), context, new_tokens)
    results["wall_s"] = time.perf_counter() - t_start
    if args.real:
        threads = sorted({sec["threads"] for sec in results["dtypes"].values()})
        print(f"\nACCEPTANCE IS REAL (a trained drafter on a target whose logits are the shipped target's), COSTS "
              f"ARE REAL, THE MODEL IS NOT ({results['device']}, {'/'.join(map(str, threads))} threads).")
    else:
        print(f"\nACCEPTANCE IS SIMULATED (calibrated oracle); COSTS ARE REAL ({results['device']}, "
              f"{results['threads']} threads).")
    for name, sec in results["dtypes"].items():
        summary, loads = sec["summary"], sec["load_average"]
        print(f"{name}: CaDDTree vs best fixed budget in hindsight (DDTree-{summary['best_fixed_budget']}): "
              f"{summary['caddtree_over_best_fixed']:.2f}x (goal >= 0.95x); CaDDTree vs {summary['transformers_cache']}: "
              f"{summary['caddtree_over_transformers']:.2f}x (goal >= 2x); AR (ours) vs it: "
              f"{summary['ar_over_transformers']:.2f}x; CaDDTree vs AR (ours): {summary['caddtree_over_ar']:.2f}x; "
              f"load average (1 min) min {min(loads):.2f} median {statistics.median(loads):.2f} max {max(loads):.2f}")
    print(f"wall time {results['wall_s']:.0f} s")
    _save(results, args.out)
    return results


def bench_dtype(args, dtype, context: int, new_tokens: int) -> dict:
    """One dtype's section: the models, the oracle, the cost profile, every method side by side."""
    loads = [os.getloadavg()[0]]
    hf, fast, drafter = make_models(args.quick, args.seed, dtype)
    print(f"{device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"target {fast.num_hidden_layers} layers, hidden {fast.hidden_size}, vocab {fast.vocab_size}, "
          f"{sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M parameters, {dtype}; drafter "
          f"{len(drafter.layers)} layers, block {drafter.block_size}; context {context}, {new_tokens} new tokens")
    results = {}

    oracle = Oracle(depth=drafter.block_size - 1)
    results["oracle"] = calibrate(oracle, R=256 if args.quick else 1024)
    got = results["oracle"]["expected_acceptance"]
    print(f"oracle: expected acceptance chain {got['dflash_chain']:.2f} (published 7.8), "
          f"DDTree-256 {got['ddtree_256']:.2f} (10.7)")
    rounds = oracle.rounds(new_tokens + 1, fast.vocab_size, args.seed + 1)
    prompt = torch.randint(0, fast.vocab_size, (1, context))
    target, oracle_drafter = OracleTarget(fast, rounds[2]), OracleDrafter(drafter, rounds[0], rounds[1])

    # The cost model, measured here: ddtree.cost.profile over a coarse grid (what `ddtree profile` runs)
    fast.set_feature_layers(list(drafter.target_layer_ids))
    drafter.reset(1, context + 64)
    x0, zero = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    f0 = torch.zeros(1, 1, fast.hidden_size * len(drafter.target_layer_ids), dtype=dtype)
    t = time.perf_counter()
    cost = profile(fast, lambda: drafter.draft(fast, x0, f0, zero), max_nodes=max(BUDGETS),
                   contexts=[context, context + new_tokens], node_grid=PROFILE_GRID,
                   warmup=1, repeats=args.repeats, progress=False)
    loads.append(os.getloadavg()[0])
    measured = cost.measured["verify_median_ms"][0]
    print(f"profiled in {time.perf_counter() - t:.0f} s: Cd {cost.draft_cost:.1f} ms; Cv(n) at context {context}, "
          "measured (the model's non-decreasing fit): "
          + ", ".join(f"{n}:{m:.0f} ({ms:.0f})" for n, m, ms in zip(cost.node_grid, measured, cost.verify_ms[0]))
          + " ms")
    results["cost"] = {"fast": {"node_grid": cost.node_grid, "contexts": cost.contexts,
                                "verify_ms": cost.verify_ms.tolist(), "measured": cost.measured,
                                "draft_ms": cost.draft_cost}}
    # Every method once as a warm-up, then --passes passes over all of them in turn: on a shared machine
    # the speed drifts by minutes, and interleaving lets the drift hit every method alike (medians reported).
    prompt_ids = prompt[0].tolist()

    def ours(m, b):
        def once(n):
            r = run_method(m, b, target, oracle_drafter, prompt_ids, n, cost)
            r["budget"] = None if m == "caddtree" else b  # run_method records the cap; the cap is BUDGETS' max
            return r
        return once

    methods = transformers_methods(hf, prompt)
    for m, b in [("ar", None), ("dflash", None)] + [("ddtree", b) for b in BUDGETS] + [("caddtree", max(BUDGETS))]:
        methods[m + (f"-{b}" if m == "ddtree" else "")] = ours(m, b)
        methods[m + (f"-{b}" if m == "ddtree" else "")](8)  # warm-up
    samples = {name: [] for name in methods}
    for p in range(args.passes):
        for name, once in methods.items():
            samples[name].append(once(new_tokens))
            loads.append(os.getloadavg()[0])
        print(f"pass {p + 1}/{args.passes} done at {time.perf_counter() - t:.0f} s")
    runs = []
    for name, rs in samples.items():
        speeds = [r["tokens_per_s"] for r in rs]
        runs.append({**rs[0], "tokens_per_s": statistics.median(speeds), "tokens_per_s_passes": speeds})
        _print_run(runs[-1])
    results["runs"] = runs
    results["load_average"] = loads

    by = {(r["method"], r["budget"]): r for r in runs}
    cad, ar = by[("caddtree", None)], by[("ar", None)]
    hf_best = max((r for r in runs if r["method"].startswith("transformers")), key=lambda r: r["tokens_per_s"])
    best = max((r for r in runs if r["method"] == "ddtree"), key=lambda r: r["tokens_per_s"])
    summary = {"caddtree_over_best_fixed": cad["tokens_per_s"] / best["tokens_per_s"], "best_fixed_budget": best["budget"],
               "caddtree_over_transformers": cad["tokens_per_s"] / hf_best["tokens_per_s"],
               "transformers_cache": hf_best["method"], "ar_over_transformers": ar["tokens_per_s"] / hf_best["tokens_per_s"],
               "caddtree_over_ar": cad["tokens_per_s"] / ar["tokens_per_s"]}
    results["summary"] = summary
    return results


def real_models(args, dtype, tmp: Path):
    """--real: (transformers model, fast runner, drafter): the scaled target (written to ``tmp`` unless
    ``--scaled``) and the trained drafter."""
    from transformers import AutoModelForCausalLM

    base, shipped_drafter = pretrained_pair()
    folder = args.scaled
    if folder is None:
        base_cfg = json.loads((base / "config.json").read_text())
        shape = QUICK_SHAPE if args.quick else st.shape_like(base_cfg, "qwen3-0.6b")
        folder = tmp / "target"
        st.write_scaled_target(base, folder, shape, seed=args.seed, like=None if args.quick else "qwen3-0.6b")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
    fast = FastTarget.from_model(hf)
    drafter = DFlashDrafter.from_pretrained(args.drafter or shipped_drafter, dtype=dtype)
    return hf, fast, drafter


def held_out_prompts(count: int, context: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``context`` tokens from the held-out files of the drafter's training corpus."""
    _, held = train.load_corpus(held_out_only=True)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, held.numel() - context, (count,), generator=g).tolist()
    return [held[s:s + context].tolist() for s in starts]


def run_real(fast, drafter, prompts, method: str, budget, new_tokens: int, cost, mode: str = "request") -> dict:
    """``ddtree.decode.generate`` on the real pair: ``new_tokens`` per prompt; decode time excludes the prefill."""
    out = decode.generate(fast, drafter, prompts, method=method, max_new_tokens=new_tokens,
                          max_nodes=budget or max(REAL_BUDGETS), cost_model=cost, budget_mode=mode)
    seconds = out.total_s - out.prefill_s
    tokens = sum(len(t) - 1 for t in out.tokens)  # the first token of each is the prefill's
    name = method if len(prompts) == 1 else f"{method} ({mode}, batch {len(prompts)})"
    return {"method": name, "budget": None if method == "caddtree" else budget, "batch": len(prompts),
            "tokens": tokens, "rounds": len(out.rounds), "seconds": seconds, "tokens_per_s": tokens / seconds,
            "acceptance": out.acceptance_length, "budgets": [n for r in out.rounds for n in r.tree_size],
            "output": out.tokens}


def bench_real(args, dtype, context: int, new_tokens: int) -> dict:
    """--real: one dtype's section with the trained drafter on the cost-scaled target."""
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="ddtree-scaled-") as tmp:
        hf, fast, drafter = real_models(args, dtype, Path(tmp))
    threads = torch.get_num_threads()
    if st.param_count(fast.config.to_dict()) < SMALL_MODEL_PARAMS:  # --quick's model: one thread, as generate's
        torch.set_num_threads(1)  # "auto" (profiled on two, hand-offs would price every tree alike)
    try:
        return _bench_real(args, dtype, context, new_tokens, hf, fast, drafter, loads)
    finally:
        torch.set_num_threads(threads)


def _bench_real(args, dtype, context, new_tokens, hf, fast, drafter, loads) -> dict:
    print(f"{device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"scaled target (NOT A REAL MODEL) {fast.num_hidden_layers} layers, hidden {fast.hidden_size}, "
          f"{st.param_count(fast.config.to_dict()) / 1e6:.0f}M parameters, {dtype}; drafter {len(drafter.layers)} "
          f"layers, block {drafter.block_size}; context {context}, {new_tokens} new tokens")
    prompts = held_out_prompts(max([1, *args.batches]), context, args.seed)
    results = {"threads": torch.get_num_threads()}

    # The cost model, measured here, with the padded batch curves the batch and ragged modes read.
    fast.set_feature_layers(list(drafter.target_layer_ids))
    F = len(drafter.target_layer_ids) * fast.hidden_size

    def drafter_round_at(B: int):
        drafter.reset(B, context + drafter.block_size + 2)
        zero = torch.zeros(B, dtype=torch.long)
        drafter.draft(fast, zero, torch.zeros(B, context, F, dtype=dtype), torch.full((B,), context))
        return lambda: drafter.draft(fast, zero, torch.zeros(B, 1, F, dtype=dtype), zero)

    t = time.perf_counter()
    cost = profile(fast, None, max_nodes=max(REAL_BUDGETS), contexts=[context, context + new_tokens],
                   node_grid=PROFILE_GRID, batch_sizes=[1, *args.batches],
                   drafter_round_at=drafter_round_at, warmup=1, repeats=args.repeats, progress=False)
    loads.append(os.getloadavg()[0])
    print(f"profiled in {time.perf_counter() - t:.0f} s: Cd {cost.draft_cost:.1f} ms; Cv(n) at context {context}: "
          + ", ".join(f"{n}:{ms:.0f}" for n, ms in zip(cost.node_grid, cost.verify_ms[0])) + " ms")
    results["cost"] = {"node_grid": cost.node_grid, "contexts": cost.contexts, "verify_ms": cost.verify_ms.tolist(),
                       "measured": cost.measured, "draft_ms": cost.draft_cost}

    prompt = torch.tensor([prompts[0]])
    methods = transformers_methods(hf, prompt)
    plan = [("ar", None, 1, "request"), ("dflash", None, 1, "request")] + \
        [("ddtree", b, 1, "request") for b in REAL_BUDGETS] + [("caddtree", None, 1, "request")] + \
        [("caddtree", None, B, mode) for B in args.batches for mode in ("batch", "ragged")]
    for m, b, B, mode in plan:
        name = m + (f"-{b}" if m == "ddtree" else "") + ("" if B == 1 else f" ({mode}, batch {B})")
        methods[name] = lambda n, m=m, b=b, B=B, mode=mode: run_real(fast, drafter, prompts[:B], m, b, n, cost, mode)
        methods[name](4)  # warm-up
    samples = {name: [] for name in methods}
    for p in range(args.passes):
        for name, once in methods.items():
            samples[name].append(once(new_tokens))
            loads.append(os.getloadavg()[0])
        print(f"pass {p + 1}/{args.passes} done at {time.perf_counter() - t:.0f} s")
    runs = []
    ar_tokens = samples["ar"][0]["output"]
    for name, rs in samples.items():
        speeds = [r["tokens_per_s"] for r in rs]
        run = {k: v for k, v in rs[0].items() if k != "output"}
        if rs[0].get("batch") == 1:  # exact speculative decoding: every batch-1 method's text is AR's
            run["same_as_ar"] = rs[0]["output"] == ar_tokens
        runs.append({**run, "tokens_per_s": statistics.median(speeds), "tokens_per_s_passes": speeds})
        _print_run(runs[-1])
    results["runs"] = runs
    results["load_average"] = loads

    single = [r for r in runs if r.get("batch", 1) == 1]
    by = {(r["method"], r["budget"]): r for r in single}
    cad, ar = by[("caddtree", None)], by[("ar", None)]
    hf_best = max((r for r in runs if r["method"].startswith("transformers")), key=lambda r: r["tokens_per_s"])
    best = max((r for r in single if r["method"] == "ddtree"), key=lambda r: r["tokens_per_s"])
    results["summary"] = {
        "caddtree_over_best_fixed": cad["tokens_per_s"] / best["tokens_per_s"], "best_fixed_budget": best["budget"],
        "caddtree_over_transformers": cad["tokens_per_s"] / hf_best["tokens_per_s"],
        "transformers_cache": hf_best["method"], "ar_over_transformers": ar["tokens_per_s"] / hf_best["tokens_per_s"],
        "caddtree_over_ar": cad["tokens_per_s"] / ar["tokens_per_s"],
        "every_method_same_as_ar": all(r["same_as_ar"] for r in single if "same_as_ar" in r)}
    return results


def _print_run(r):
    name = r["method"] + (f"-{r['budget']}" if r["budget"] else "")
    passes = "/".join(f"{v:.2f}" for v in r.get("tokens_per_s_passes", []))
    print(f"{name:>28}: {r['tokens_per_s']:8.2f} tok/s ({passes})  acceptance {r['acceptance']:5.2f}  "
          f"mean tree {statistics.mean(r['budgets']):6.1f}  rounds {r['rounds']:4d}")


def plot(results: dict, path: Path) -> Path:
    """Tokens/s against the node budget, one panel per dtype, CaDDTree and the chain methods marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = results["dtypes"]
    fig, axes = plt.subplots(1, len(sections), figsize=(6.4 * len(sections), 4.2), squeeze=False)
    for ax, (name, sec) in zip(axes[0], sections.items()):
        runs = sec["runs"]
        tree = sorted((r for r in runs if r["method"] == "ddtree"), key=lambda r: r["budget"])
        ax.plot([r["budget"] for r in tree], [r["tokens_per_s"] for r in tree], "o-", label="DDTree, fixed budget")
        cad = next(r for r in runs if r["method"] == "caddtree")
        ax.axhline(cad["tokens_per_s"], color="C3", lw=1)
        ax.plot([statistics.mean(cad["budgets"])], [cad["tokens_per_s"]], "*", color="C3", ms=14,
                label=f"CaDDTree (at its mean tree size {statistics.mean(cad['budgets']):.0f})")
        for i, r in enumerate(r for r in runs if r["method"] not in ("ddtree", "caddtree") and r.get("batch", 1) == 1):
            ax.axhline(r["tokens_per_s"], ls=":", color=f"C{4 + i}", label=r["method"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("node budget")
        ax.set_ylabel("decode tokens/s")
        what = ("shipped target scaled to Qwen3-0.6B's cost, real drafter" if results.get("real")
                else "Qwen3-0.6B shape, random weights, oracle acceptance")
        ax.set_title(f"{what}, {name} ({results['threads']} CPU threads)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _save(results, out):
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'} and {plot(results, out / 'tokens_per_s_vs_budget.png')}")


if __name__ == "__main__":
    main()
