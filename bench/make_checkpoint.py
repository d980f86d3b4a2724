"""Write a random-weight checkpoint folder (config.json + safetensors) of the benchmark's target shape,
for commands that take ``--target DIR`` (``ddtree profile``): ``python bench/make_checkpoint.py --out DIR``.

Qwen3-8B's shape by default (about 16 GB in bf16: build it on the GPU machine's disk); ``--small`` for the
tiny CPU shape.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import target_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(target_config(args.small), dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    print(f"wrote {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
