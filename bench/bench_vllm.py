"""vLLM on a target + DFlash drafter pair: no speculation, DFlash chains, the plugin's DDTree / CaDDTree.

Run in an environment with vLLM 0.32 and ddtree built against its torch (scripts/vllm_check.sh builds
one: build/vllm-env/bin/python bench/bench_vllm.py). Each configuration runs in an engine process of
its own (vLLM loads the plugin when its processes start); the table gives generated tokens per second
of llm.generate (engine start-up excluded), and vLLM's own speculative counters: tokens per
verification round (accepted draft tokens per draft + the bonus token) and draft tokens per round.

The pair is the shipped one unless ``--target``/``--drafter`` name others (e.g. a ``ddtree scale-target``
folder, which costs like a real model while its outputs stay the shipped target's). ``--server`` drives
vLLM's OpenAI-compatible server (one per configuration, on 127.0.0.1) with as many concurrent HTTP
clients as the concurrency, each sending its requests one after another, instead of ``llm.generate``
over a batch. ``--plot`` draws tokens/s relative to no speculation against the concurrency. CaDDTree
reads this engine's measured costs when ``ddtree profile --vllm`` has cached them (``--profile`` runs it
first), else the roofline estimate (the configuration's log line says which).

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

    target, drafter = cfg.get("target"), cfg.get("drafter")
    if not target:
        target, drafter = (str(p) for p in pretrained_pair(cfg.get("block", 8)))
    spec = None
    if cfg["method"]:
        spec = {"method": "dflash", "model": drafter, "num_speculative_tokens": cfg["n"]}
    llm = LLM(model=target, speculative_config=spec, dtype=cfg.get("dtype", "float32"), max_model_len=1024, enforce_eager=True,
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


# (name, speculative method, DDTREE_VLLM_TREE, num_speculative_tokens[, DDTREE_VLLM_BUDGET_MODE])
CONFIGS = [("vllm", None, None, 0), ("dflash-3", "dflash", None, 3), ("dflash-5", "dflash", None, 5),
           ("dflash-7", "dflash", None, 7), ("ddtree-7", "dflash", "ddtree", 7), ("ddtree-16", "dflash", "ddtree", 16),
           ("ddtree-32", "dflash", "ddtree", 32), ("caddtree-32", "dflash", "caddtree", 32),
           ("caddtree-32-request", "dflash", "caddtree", 32), ("caddtree-32-ragged", "dflash", "caddtree", 32)]
BREAKDOWN_CONFIGS = [("vllm", None, None, 0), ("dflash-7", "dflash", None, 7), ("ddtree-7", "dflash", "ddtree", 7),
                     ("ddtree-16", "dflash", "ddtree", 16), ("caddtree-16", "dflash", "caddtree", 16),
                     ("caddtree-16-request", "dflash", "caddtree", 16),
                     ("caddtree-16-ragged", "dflash", "caddtree", 16)]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spec_counters(url: str) -> dict:
    import requests

    out = {}
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:spec_decode_num_") and "_total" in line and "per_pos" not in line:
            name = line.split("{")[0].replace("_total", "")
            out[name] = out.get(name, 0.0) + float(line.split()[-1])
    return out


def serve(cfg: dict, env: dict, concurrencies: list[int], log_path: str) -> list[dict]:
    """vLLM's OpenAI-compatible server for one configuration; per concurrency c, c clients each sending
    ``cfg["requests_per_client"]`` completions one after another. Tokens/s over the whole wave."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from ddtree.demo import pretrained_pair

    target, drafter = cfg.get("target"), cfg.get("drafter")
    if not target:
        target, drafter = (str(p) for p in pretrained_pair(cfg.get("block", 8)))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", target, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", cfg.get("dtype", "float32"), "--max-model-len", "1024", "--enforce-eager",
            "--max-num-seqs", str(max(concurrencies)), "--kv-cache-memory-bytes", str(256 << 20), "--seed", "0",
            "--no-async-scheduling"]
    if cfg["method"]:
        args += ["--speculative-config", json.dumps({"method": "dflash", "model": drafter,
                                                     "num_speculative_tokens": cfg["n"]})]
    log = open(log_path, "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}); see {log_path}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {log_path}")
            time.sleep(1)

        def one(prompt: str) -> int:
            body = {"model": target, "prompt": prompt, "max_tokens": cfg["max_tokens"], "temperature": 0.0,
                    "ignore_eos": True}
            r = requests.post(url + "/v1/completions", json=body, timeout=3600)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        one(PROMPTS[0])  # warm-up
        rows = []
        for c in concurrencies:
            per_client = cfg.get("requests_per_client", 2)
            before = _spec_counters(url)
            start = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                tokens = sum(pool.map(lambda i: sum(one(PROMPTS[(i * per_client + j) % len(PROMPTS)])
                                                    for j in range(per_client)), range(c)))
            seconds = time.perf_counter() - start
            after = _spec_counters(url)
            row = {"batch": c, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
            drafts = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
            if drafts:
                row["tokens_per_round"] = 1 + (after["vllm:spec_decode_num_accepted_tokens"]
                                               - before["vllm:spec_decode_num_accepted_tokens"]) / drafts
                row["draft_tokens_per_round"] = (after["vllm:spec_decode_num_draft_tokens"]
                                                 - before["vllm:spec_decode_num_draft_tokens"]) / drafts
            rows.append(row)
        return rows
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def plot(results: dict, batches: list[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = [r["tokens_per_s"] for r in results["vllm"]]
    for name, rows in results.items():
        ax.plot(batches, [r["tokens_per_s"] / b for r, b in zip(rows, base)], "o-" if "caddtree" in name else ".--",
                label=name, lw=2 if "caddtree" in name else 1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("concurrency (requests at once)")
    ax.set_ylabel("tokens/s relative to no speculation")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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


def _engine_env() -> dict:
    """This process's environment for an engine, without the plugin's per-configuration settings (tree and
    budget mode: each configuration sets its own); a cost model or cost cache given by the user passes."""
    keep = ("DDTREE_VLLM_COST_MODEL", "DDTREE_VLLM_COST_CACHE")
    return {k: v for k, v in os.environ.items() if not k.startswith("DDTREE_VLLM") or k in keep}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16", help="batch sizes (prompts per generate call)")
    ap.add_argument("--breakdown", action="store_true", help="time where a step goes (no speculation, "
                    "DFlash 7, DDTree 7, CaDDTree 16 per budget mode), in the benchmark's process")
    ap.add_argument("--configs", help="only these configurations (comma-separated names)")
    ap.add_argument("--repeats", type=int, default=1, help="generate calls per batch size; the fastest is kept")
    ap.add_argument("--target", help="target folder (default: the shipped target)")
    ap.add_argument("--drafter", help="DFlash drafter folder (default: the shipped block-8 drafter, or --block's)")
    ap.add_argument("--block", type=int, default=8, choices=(8, 16), help="which shipped drafter (default 8)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--server", action="store_true", help="the OpenAI-compatible server under concurrent HTTP "
                    "clients (--batches are the concurrencies) instead of llm.generate")
    ap.add_argument("--requests-per-client", type=int, default=2, help="--server: completions each client sends")
    ap.add_argument("--profile", action="store_true", help="run `ddtree profile --vllm` for the pair first, so "
                    "CaDDTree prices with this engine's measured costs")
    ap.add_argument("--plot", help="write the tokens/s-vs-concurrency plot here (PNG)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one configuration
    args = ap.parse_args()
    if args.engine:
        print("RESULT " + json.dumps(engine(json.loads(args.engine))), flush=True)
        return
    batches = [int(b) for b in args.batches.split(",")]
    if args.target and not args.drafter:
        ap.error("argument --target: give --drafter too")
    from ddtree.demo import pretrained_pair

    shipped_target, shipped_drafter = map(str, pretrained_pair(args.block))
    if args.profile:
        # The batch sizes benchmarked (and 1, which every cost model starts at): a big target at --batches 1 is
        # not profiled at 64 requests.
        sizes = sorted({1, *batches})
        target_dir, profiled_drafter = (args.target, args.drafter) if args.target else (shipped_target, shipped_drafter)
        cmd = [sys.executable, "-m", "ddtree", "profile", "--vllm", "--dtype", args.dtype,
               "--batch-sizes", ",".join(map(str, sizes)), "--target", target_dir, "--drafter", profiled_drafter]
        subprocess.run(cmd, env=_engine_env(), check=True)
    # DFlash at every draft length its block allows, from the list and the longest (block - 1).
    drafter_dir = args.drafter or shipped_drafter
    with open(os.path.join(drafter_dir, "config.json")) as f:
        block = json.load(f).get("block_size", 8)
    configs = [c for c in (BREAKDOWN_CONFIGS if args.breakdown else CONFIGS) if c[1] is None or c[2] or c[3] < block]
    if not args.breakdown and all(c[0] != f"dflash-{block - 1}" for c in configs):
        configs.insert(next(i for i, c in enumerate(configs) if c[2]), (f"dflash-{block - 1}", "dflash", None, block - 1))
    results = {}
    for name, method, tree, n in configs:
        if args.configs and name not in args.configs.split(","):
            continue
        env = _engine_env()
        if tree:
            env["DDTREE_VLLM_TREE"] = tree
        if name.endswith(("-request", "-ragged")):  # the plain name: the default mode (batch)
            env["DDTREE_VLLM_BUDGET_MODE"] = name.rsplit("-", 1)[1]
        if args.breakdown:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        cfg = {"method": method, "n": n, "max_tokens": args.max_tokens, "batches": batches,
               "breakdown": args.breakdown, "repeats": args.repeats, "target": args.target,
               "drafter": args.drafter, "block": args.block, "dtype": args.dtype,
               "requests_per_client": args.requests_per_client}
        if args.server:
            log_path = f"{args.out or 'bench_vllm'}.{name}.server.log"
            results[name] = serve(cfg, env, batches, log_path)
            with open(log_path) as f:
                cfg["plugin_log"] = [line.strip() for line in f if "ddtree.vllm:" in line][:1]
            if cfg["plugin_log"]:
                print(f"{name}: {cfg['plugin_log'][0][-240:]}", file=sys.stderr)
            print(f"{name} done", file=sys.stderr)
            continue
        proc = subprocess.run([sys.executable, __file__, "--engine", json.dumps(cfg)], env=env, text=True,
                              capture_output=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][7:])["rows"]
        plugin_log = [line for line in (proc.stdout + proc.stderr).splitlines() if "ddtree.vllm:" in line]
        print(f"{name} done" + (f": {plugin_log[0][-240:]}" if plugin_log else ""), file=sys.stderr)
    load = os.getloadavg()[0]
    from ddtree.timing import device_name
    import torch

    pair = f"{args.target} + {args.drafter}" if args.target else f"shipped pair (block {args.block})"
    where = "OpenAI server, concurrent clients" if args.server else "llm.generate"
    print(f"{pair}, {args.dtype}, greedy, {args.max_tokens} tokens per request, {where}; "
          f"{device_name(torch.device('cpu'))}, {os.cpu_count()} CPUs, load average after {load:.1f}")
    if args.breakdown:
        print_breakdown(results, batches)
    print(f"{'config':<19} {'conc.':>5} {'tok/s':>8} {'x vllm':>7} {'x best':>7} {'tok/round':>9} {'drafted/round':>13}")
    for b_i, batch in enumerate(batches):
        base = results["vllm"][b_i]["tokens_per_s"] if "vllm" in results else float("nan")
        # The goal's anchor: the better of no speculation and DFlash at its best draft length.
        anchor = max((rows[b_i]["tokens_per_s"] for name, rows in results.items()
                      if name == "vllm" or name.startswith("dflash")), default=float("nan"))
        for name, rows in results.items():
            r = rows[b_i]
            print(f"{name:<19} {batch:>5} {r['tokens_per_s']:>8.1f} {r['tokens_per_s'] / base:>7.2f} "
                  f"{r['tokens_per_s'] / anchor:>7.2f} {r.get('tokens_per_round', 1.0):>9.2f} "
                  f"{r.get('draft_tokens_per_round', 0.0):>13.1f}")
    if args.plot and "vllm" in results:
        plot(results, batches, args.plot, f"{pair}, {where}, {args.max_tokens} tokens/request")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"max_tokens": args.max_tokens, "load_after": load, "pair": pair, "server": args.server,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
