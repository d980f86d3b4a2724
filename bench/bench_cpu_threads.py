"""Does any method collapse when another process keeps one CPU core busy?

Runs ar, dflash, ddtree and caddtree on the shipped trained pair (what ``ddtree generate`` runs by
default: the Hugging Face runner on CPU, float32, greedy, budget 64, the default cost model) twice per
repeat: on the machine as it is ("idle") and while a busy-loop process spins on one core ("busy"; it is
pinned to the last core and ends by itself after a bounded time even if this script dies). Two thread
choices side by side: ``auto`` (the CLI's ``--threads auto`` and ``generate``'s ``threads="auto"``: one
thread for a model this small) and torch's own default (``generate(..., threads=None)``, which leaves torch's
setting alone: what the library did before it chose threads).

tokens/s is what ``ddtree generate`` prints: generated tokens over the whole call, prefill included.
Medians over the repeats; the conditions are interleaved so slow drift in the machine's load hits both.
The load average is printed: on a shared machine "idle" means "without our busy loop", no more.

    python3 bench/bench_cpu_threads.py                    # about 1-2 minutes
    python3 bench/bench_cpu_threads.py --repeats 5 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import use_checkout_if_built  # noqa: E402

use_checkout_if_built()  # the checkout's ddtree if it is built, else the installed one
from ddtree import cli  # noqa: E402
from ddtree.decode import generate  # noqa: E402
from ddtree.demo import pretrained_pair  # noqa: E402
from ddtree.drafter import DFlashDrafter  # noqa: E402
from ddtree.target import load_target  # noqa: E402

METHODS = ("ar", "dflash", "ddtree", "caddtree")
PROMPT = "    def __init__(self, "
BUSY_LOOP = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def start_busy_core(seconds: float) -> subprocess.Popen:
    """A process spinning on the last core for at most ``seconds`` (it stops itself; we also stop it)."""
    cores = sorted(os.sched_getaffinity(0))
    core = cores[-1]
    return subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=seconds)],
                            preexec_fn=lambda: os.sched_setaffinity(0, {core}))


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def tokens_per_s(target, drafter, ids, method: str, new_tokens: int) -> float:
    out = generate(target, None if method == "ar" else drafter, [ids], method=method, max_new_tokens=new_tokens,
                   max_nodes=cli.DEFAULT_MAX_NODES, threads=None)  # None: the count this script set
    return len(out.tokens[0]) / out.total_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per (condition, threads, method); medians reported")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per generate call (the CLI's default)")
    ap.add_argument("--json", type=Path, help="write the raw samples here")
    args = ap.parse_args(argv)

    tdir, ddir = pretrained_pair()
    target = load_target(tdir, device="cpu", dtype=torch.float32)  # what the CLI loads on CPU
    drafter = DFlashDrafter.from_pretrained(ddir, device="cpu", dtype=torch.float32)
    ids = cli._encode_prompt(cli._load_tokenizer(tdir), PROMPT)
    torch_default = torch.get_num_threads()
    n_params = cli._num_params(target)
    cli._set_threads(None, "cpu", n_params)  # what --threads auto picks for this model
    auto = torch.get_num_threads()
    choices = {f"auto ({auto})": auto, f"torch ({torch_default})": torch_default}
    print(f"shipped pair: target {n_params / 1e6:.2f}M parameters; cores {len(os.sched_getaffinity(0))}; "
          f"threads: --threads auto -> {auto}, torch default -> {torch_default}; {args.new_tokens} tokens; "
          f"load average at start {os.getloadavg()[0]:.2f}")

    for n in set(choices.values()):  # warm-up: first calls allocate and pick kernels
        torch.set_num_threads(n)
        for m in METHODS:
            tokens_per_s(target, drafter, ids, m, 16)

    samples: dict[tuple, list[float]] = {}
    loads = []
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        for condition in ("idle", "busy"):
            busy = start_busy_core(120) if condition == "busy" else None
            try:
                if busy is not None:
                    time.sleep(0.2)  # let it reach its core
                loads.append(os.getloadavg()[0])
                for label, n in choices.items():
                    torch.set_num_threads(n)
                    for m in METHODS:
                        samples.setdefault((condition, label, m), []).append(
                            tokens_per_s(target, drafter, ids, m, args.new_tokens))
            finally:
                if busy is not None:
                    stop(busy)
    torch.set_num_threads(torch_default)
    wall = time.perf_counter() - t0

    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"\n{args.repeats} repeats in {wall:.0f} s; load average (1 min) during the runs: "
          f"min {min(loads):.2f}, median {statistics.median(loads):.2f}, max {max(loads):.2f}")
    print(f"\n{'threads':>12} {'method':>9} {'idle tok/s':>11} {'busy tok/s':>11} {'busy/idle':>10} "
          f"{'idle xAR':>9} {'busy xAR':>9}")
    for label in choices:
        for m in METHODS:
            idle, busy = med[("idle", label, m)], med[("busy", label, m)]
            print(f"{label:>12} {m:>9} {idle:11.0f} {busy:11.0f} {busy / idle:10.2f} "
                  f"{idle / med[('idle', label, 'ar')]:9.2f} {busy / med[('busy', label, 'ar')]:9.2f}")
    print("\ngoals: tree methods (ddtree, caddtree) >= 2x AR idle and busy; every busy/idle >= 0.5")
    if args.json:
        args.json.write_text(json.dumps({"loads": loads, "threads": choices, "new_tokens": args.new_tokens,
                                         "samples": {"|".join(k): v for k, v in samples.items()}}, indent=1))


if __name__ == "__main__":
    main()
