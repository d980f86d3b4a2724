"""The shipped drafters of the tiny stdlib-char target (block sizes 8 and 16), side by side in one run.

Per drafter: held-out acceptance (:func:`ddtree.train.evaluate`: 8 held-out prompts of 64 characters, 96
new tokens, greedy, batch 8) of the DFlash chain, DDTree at 16 / 64 / 256 nodes and CaDDTree (cap 64),
CaDDTree priced by the built-in estimate and by the cost model ``ddtree demo`` measures
(:func:`ddtree.demo.demo_cost_model`, measured here for these prompts, not cached); then batch-1
tokens/s as ``ddtree demo`` runs it (one thread, each prompt decoded on its own after a warm-up): per
pass every (drafter, method) decodes every prompt, interleaved so load from other processes falls on
all of them alike; the median over passes of tokens / seconds. Prints a markdown table and the CPU's
vector/matrix units.

    PYTHONPATH=python python bench/bench_drafters.py [--passes 3] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ddtree import decode, demo, train  # noqa: E402
from ddtree.drafter import DFlashDrafter  # noqa: E402
from ddtree.target import load_target  # noqa: E402
from ddtree.timing import device_name  # noqa: E402

BUDGETS = (16, 64, 256)
CAP = 64


def cpu_units() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    units = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return ", ".join(units) or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passes", type=int, default=3, help="timed passes (medians reported)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts (the RESULTS block-8 table used 8)")
    ap.add_argument("--out", type=Path, help="JSON file for every number")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    _, held = train.load_corpus(held_out_only=True)
    prompts = train._windows(held, args.prompts, 64, torch.Generator().manual_seed(0)).tolist()  # evaluate()'s
    new_tokens = 96
    print(f"device {device_name('cpu')} ({cpu_units()}), 1 torch thread, load average {os.getloadavg()}")

    pairs, results = {}, {}
    for block in sorted(demo.DRAFTERS):
        tdir, ddir = demo.pretrained_pair(block)
        target = load_target(tdir)
        drafter = DFlashDrafter.from_pretrained(ddir, dtype=target.dtype)
        model, where = demo.demo_cost_model(target, drafter, prompts[0], new_tokens, CAP, (tdir, ddir), cache=False)
        pairs[block] = (target, drafter, {"demo": model, "default": decode.default_cost_model(target), None: None})
        acc = train.evaluate(tdir, ddir, held, prompts=args.prompts, budgets=BUDGETS, max_nodes=CAP)
        acc["caddtree-demo"] = train.evaluate(tdir, ddir, held, prompts=args.prompts, budgets=(), max_nodes=CAP,
                                              cost_model=model)["caddtree"]
        results[block] = {"acceptance": acc, "cost_model": {"draft_ms": model.draft_cost,
                          "verify_ms_0_7_15_64": model.verify_cost([0, 7, 15, 64], 64).tolist(), "how": where},
                          "tokens_per_s": {}}
        print(f"block {block}: demo cost model ({where}): Cd {model.draft_cost:.2f} ms, Cv(0/7/15/64) "
              + " / ".join(f"{v:.2f}" for v in model.verify_cost([0, 7, 15, 64], 64)) + " ms")

    runs = [("ar", "ar", 0, None), ("dflash", "dflash", 0, None)]
    runs += [(f"ddtree-{n}", "ddtree", n, None) for n in BUDGETS]
    runs += [("caddtree", "caddtree", CAP, "default"), ("caddtree-demo", "caddtree", CAP, "demo")]
    seconds = {(b, name): [] for b in pairs for name, *_ in runs}
    tokens = {}
    for p in range(args.passes + 1):  # pass 0 warms up
        for name, method, nodes, which in runs:
            for block, (target, drafter, models) in pairs.items():
                cm = models[which]  # built once: the built-in estimate is not rebuilt inside the timed decodes
                t, n = 0.0, 0
                for x in prompts:
                    t0 = time.perf_counter()
                    out = decode.generate(target, drafter, [x], method=method, max_new_tokens=new_tokens,
                                          max_nodes=nodes, cost_model=cm, threads=None)
                    t += time.perf_counter() - t0
                    n += len(out.tokens[0])
                if p:
                    seconds[(block, name)].append(t)
                tokens[(block, name)] = n
    for (block, name), ts in seconds.items():
        results[block]["tokens_per_s"][name] = statistics.median(tokens[(block, name)] / t for t in ts)

    print(f"\n| method | " + " | ".join(f"block {b}: acceptance, mean tree, tokens/s" for b in pairs) + " |")
    print("|---|" + "---|" * len(pairs))
    for name, *_ in runs:
        cells = []
        for block in pairs:
            a, tps = results[block]["acceptance"][name], results[block]["tokens_per_s"][name]
            same = "" if a["same_as_ar"] else " DIFFERS"
            cells.append(f"{a['acceptance_length']:.2f}, {a['mean_tree_size']:.1f}, {tps:.0f}{same}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for block in pairs:
        tps = results[block]["tokens_per_s"]
        print(f"block {block}: caddtree-demo / dflash tokens/s {tps['caddtree-demo'] / tps['dflash']:.3f}, "
              f"best ddtree / dflash {max(tps[f'ddtree-{n}'] for n in BUDGETS) / tps['dflash']:.3f}")
    wall = time.perf_counter() - t_start
    print(f"wall {wall:.0f} s, load average {os.getloadavg()}")
    if args.out:
        args.out.write_text(json.dumps({"device": device_name("cpu"), "cpu_units": cpu_units(), "passes": args.passes,
                                        "results": {str(b): r for b, r in results.items()}, "wall_s": wall},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
