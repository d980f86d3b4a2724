"""Does the cost-scaled target cost like the model it is named after? Forward time side by side.

One verify forward (``FastTarget``, the runner the CPU benchmarks use) over a chain of ``T`` tree slots
after a ``--context``-token prompt, for (a) the target ``ddtree scale-target --like qwen3-0.6b`` writes
(the shipped target plus dead layers: real acceptance, real cost, NOT A REAL MODEL) and (b) a
Qwen3-0.6B-shaped model with random weights (``bench_cpu_e2e.py``'s shape), same dtype, same threads.
The two are timed in turn, ``--repeats`` times each per ``T`` (medians), so load drifts hit both alike;
the 1-minute load average is printed beside the table.

    python3 bench/bench_scaled_target.py                       # writes the scaled target to a temp folder
    python3 bench/bench_scaled_target.py --scaled DIR --slots 1,16,64 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu_e2e  # noqa: E402  (puts python/ on the path)

from ddtree import ops  # noqa: E402
from ddtree import scaled_target as st  # noqa: E402
from ddtree.demo import pretrained_pair  # noqa: E402
from ddtree.fast_target import FastTarget  # noqa: E402
from ddtree.timing import device_name  # noqa: E402


@torch.inference_mode()
def verify_ms(runner: FastTarget, context: int, slots: int) -> float:
    """Milliseconds of one verify forward over a chain of ``slots`` slots after ``context`` tokens."""
    runner.reset(1, context + slots + 1)
    runner.prefill(torch.randint(0, runner.vocab_size, (1, context)), torch.tensor([context]))
    mask = ops.pack_mask(torch.tril(torch.ones(1, slots, slots, dtype=torch.bool)))
    tokens = torch.randint(0, runner.vocab_size, (1, slots))
    positions = (context + torch.arange(slots))[None]
    nodes = torch.tensor([slots - 1], dtype=torch.int32)
    t = time.perf_counter()
    runner._forward_tree(tokens, positions, mask, nodes)
    return (time.perf_counter() - t) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scaled", type=Path, help="a folder from `ddtree scale-target --like qwen3-0.6b` "
                                                "(default: write one to a temporary folder)")
    ap.add_argument("--slots", default="1,16,64", help="tree sizes in slots (root included), comma-separated")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    slots = [int(s) for s in args.slots.split(",")]
    with tempfile.TemporaryDirectory(prefix="ddtree-scaled-") as tmp:
        folder = args.scaled
        if folder is None:
            base = pretrained_pair()[0]
            folder = Path(tmp) / "target"
            shape = st.shape_like(json.loads((base / "config.json").read_text()), "qwen3-0.6b")
            st.write_scaled_target(base, folder, shape, like="qwen3-0.6b")
        scaled = FastTarget.from_pretrained(str(folder), device="cpu", dtype=dtype)
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_config(bench_cpu_e2e.target_config(False), dtype=dtype)
        named = FastTarget.from_model(hf)
        del hf
        models = {"scaled": scaled, "qwen3-0.6b shape": named}
        print(f"{device_name(torch.device('cpu'))}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}, context {args.context}")
        for name, m in models.items():
            cfg = m.config.to_dict()
            print(f"  {name}: {m.num_hidden_layers} layers, hidden {m.hidden_size}, "
                  f"{st.param_count(cfg) / 1e6:.0f}M parameters, {st.matmul_flops_per_token(cfg) / 1e9:.2f} GFLOP/token")
        loads = [os.getloadavg()[0]]
        times = {(n, s): [] for n in models for s in slots}
        for name, m in models.items():  # warm-up
            verify_ms(m, args.context, slots[0])
        for _ in range(args.repeats):
            for s in slots:
                for name, m in models.items():
                    times[(name, s)].append(verify_ms(m, args.context, s))
                loads.append(os.getloadavg()[0])
        print(f"{'slots':>6} " + " ".join(f"{n + ' ms':>20}" for n in models) + f" {'scaled / named':>15}")
        rows = []
        for s in slots:
            med = [statistics.median(times[(n, s)]) for n in models]
            rows.append({"slots": s, **{n: v for n, v in zip(models, med)}})
            print(f"{s:6d} " + " ".join(f"{v:20.1f}" for v in med) + f" {med[0] / med[1]:15.2f}")
        print(f"load average (1 min) min {min(loads):.2f} median {statistics.median(loads):.2f} max {max(loads):.2f}")
    return rows


if __name__ == "__main__":
    main()
