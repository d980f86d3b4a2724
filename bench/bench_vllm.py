"""vLLM on the shipped pair: no speculation, DFlash chains, and the ddtree plugin's DDTree / CaDDTree.

Run in an environment with vLLM 0.32 and ddtree built against its torch (scripts/vllm_check.sh builds
one: build/vllm-env/bin/python bench/bench_vllm.py). Each configuration runs in an engine process of
its own (vLLM loads the plugin when its processes start); the table gives generated tokens per second
of llm.generate (engine start-up excluded), and vLLM's own speculative counters: tokens per
verification round (accepted draft tokens per draft + the bonus token) and draft tokens per round.

``--breakdown`` instead times where an engine step goes (bench/step_breakdown.py: scheduler, runner
bookkeeping, input and attention-metadata prep, target forward and attention, sampling + accept walk, KV
compaction, drafter forward and attention, marginals -> tree), in ms per engine step, for no speculation,
DFlash, DDTree at DFlash's slot count and CaDDTree in each budget mode, with the engine in the benchmark's
process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPTS = ["def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(",
           "    return self.", "if __name__ == '__main__':\n", "from collections import", "    def __repr__(self):\n",
           "try:\n    import", "with open(path) as f:\n", "@property\ndef name(self", "raise ValueError(",
           "    for key, value in", "class Error(Exception):\n", "    elif isinstance(", "def _check(self, "]


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def run_batch(llm, params, batch: int, timers) -> dict:
    """One generate call over ``batch`` prompts: tokens/s, vLLM's speculative counters, the breakdown."""
    before = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if m.name.startswith("vllm:spec")}
    if timers:
        timers.reset()
    start = time.perf_counter()
    outs = llm.generate(prompts(batch), params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if m.name.startswith("vllm:spec")}
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    row = {"batch": batch, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    if timers:
        row["steps"] = timers.steps
        row["breakdown_ms"] = timers.per_step_ms()
    if after:
        delta = {k: after[k] - (before.get(k) or 0) for k in after if isinstance(after[k], (int, float))}
        drafts = delta.get("vllm:spec_decode_num_drafts", 0)
        if drafts:
            row["tokens_per_round"] = 1 + delta["vllm:spec_decode_num_accepted_tokens"] / drafts
            row["draft_tokens_per_round"] = delta["vllm:spec_decode_num_draft_tokens"] / drafts
    return row


def engine(cfg: dict) -> dict:
    """Runs in the engine's own process."""
    from vllm import LLM, SamplingParams

    from ddtree.demo import pretrained_pair

    timers = None
    if cfg.get("breakdown"):  # the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        from vllm.plugins import load_general_plugins

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from step_breakdown import StepTimers

        load_general_plugins()  # first, so that the timers wrap the plugin's wrappers
        timers = StepTimers().install()

    target, drafter = (str(p) for p in pretrained_pair())
    spec = None
    if cfg["method"]:
        spec = {"method": "dflash", "model": drafter, "num_speculative_tokens": cfg["n"]}
    llm = LLM(model=target, speculative_config=spec, dtype="float32", max_model_len=1024, enforce_eager=True,
              max_num_seqs=max(cfg["batches"]), seed=0, kv_cache_memory_bytes=256 << 20, disable_log_stats=False)
    params = SamplingParams(temperature=0.0, max_tokens=cfg["max_tokens"], ignore_eos=True)
    llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up
    rows = []
    for batch in cfg["batches"]:
        best = None
        for _ in range(cfg.get("repeats", 1)):  # the fastest of the repeats: the least disturbed by load
            row = run_batch(llm, params, batch, timers)
            if best is None or row["seconds"] < best["seconds"]:
                best = row
        rows.append(best)
    return {"rows": rows}


CONFIGS = [("vllm", None, None, 0), ("dflash", "dflash", None, 7), ("ddtree-16", "dflash", "ddtree", 16),
           ("ddtree-32", "dflash", "ddtree", 32), ("ddtree-64", "dflash", "ddtree", 64),
           ("caddtree-64", "dflash", "caddtree", 64)]
BREAKDOWN_CONFIGS = [("vllm", None, None, 0), ("dflash-7", "dflash", None, 7), ("ddtree-7", "dflash", "ddtree", 7),
                     ("caddtree-16", "dflash", "caddtree", 16), ("caddtree-16-batch", "dflash", "caddtree", 16),
                     ("caddtree-16-ragged", "dflash", "caddtree", 16)]


def print_breakdown(results: dict, batches: list[int]) -> None:
    for b_i, batch in enumerate(batches):
        names = list(results)
        print(f"\nbatch {batch}: ms per engine step (own time of each region)")
        print(f"{'region':<36}" + "".join(f"{n:>19}" for n in names))
        regions = list(results[names[0]][b_i]["breakdown_ms"])
        for region in regions:
            print(f"{region:<36}" + "".join(f"{results[n][b_i]['breakdown_ms'][region]:>19.2f}" for n in names))
        for key, label in (("steps", "engine steps"), ("tokens_per_round", "tokens/round"),
                           ("draft_tokens_per_round", "drafted/round"), ("tokens_per_s", "tokens/s")):
            print(f"{label:<36}" + "".join(f"{results[n][b_i].get(key, 0):>19.2f}" for n in names))
        if "dflash-7" in results and "ddtree-7" in results:
            ratio = results["ddtree-7"][b_i]["breakdown_ms"]["total"] / results["dflash-7"][b_i]["breakdown_ms"]["total"]
            print(f"{'ddtree-7 step / dflash-7 step':<36}{ratio:>19.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16", help="batch sizes (prompts per generate call)")
    ap.add_argument("--breakdown", action="store_true", help="time where a step goes (no speculation, "
                    "DFlash 7, DDTree 7, CaDDTree 16 per budget mode), in the benchmark's process")
    ap.add_argument("--configs", help="only these configurations (comma-separated names)")
    ap.add_argument("--repeats", type=int, default=1, help="generate calls per batch size; the fastest is kept")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one configuration
    args = ap.parse_args()
    if args.engine:
        print("RESULT " + json.dumps(engine(json.loads(args.engine))), flush=True)
        return
    batches = [int(b) for b in args.batches.split(",")]
    results = {}
    for name, method, tree, n in BREAKDOWN_CONFIGS if args.breakdown else CONFIGS:
        if args.configs and name not in args.configs.split(","):
            continue
        env = {k: v for k, v in os.environ.items() if not k.startswith("DDTREE_VLLM")}
        if tree:
            env["DDTREE_VLLM_TREE"] = tree
        if name.endswith(("-batch", "-ragged")):
            env["DDTREE_VLLM_BUDGET_MODE"] = name.rsplit("-", 1)[1]
        if args.breakdown:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        cfg = {"method": method, "n": n, "max_tokens": args.max_tokens, "batches": batches,
               "breakdown": args.breakdown, "repeats": args.repeats}
        proc = subprocess.run([sys.executable, __file__, "--engine", json.dumps(cfg)], env=env, text=True,
                              capture_output=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][7:])["rows"]
        print(f"{name} done", file=sys.stderr)
    load = os.getloadavg()[0]
    print(f"shipped pair, fp32, greedy, {args.max_tokens} tokens per request, {os.cpu_count()} CPUs, "
          f"load average after {load:.1f}")
    if args.breakdown:
        print_breakdown(results, batches)
    print(f"{'config':<12} {'batch':>5} {'tok/s':>8} {'x vllm':>7} {'tok/round':>9} {'drafted/round':>13}")
    for b_i, batch in enumerate(batches):
        base = results["vllm"][b_i]["tokens_per_s"]
        for name, rows in results.items():
            r = rows[b_i]
            print(f"{name:<12} {batch:>5} {r['tokens_per_s']:>8.1f} {r['tokens_per_s'] / base:>7.2f} "
                  f"{r.get('tokens_per_round', 1.0):>9.2f} {r.get('draft_tokens_per_round', 0.0):>13.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"max_tokens": args.max_tokens, "load_after": load, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
