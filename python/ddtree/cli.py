"""``ddtree`` command line: ``demo``, ``generate``, ``profile``, ``train``, ``bench``.

User errors (a missing folder, a drafter that does not fit the target, an unknown method) end with one
line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METHODS = ("ar", "dflash", "ddtree", "caddtree")  # = ddtree.decode.METHODS (kept here so errors need no torch import)


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 2."""


def _read_config(folder: str, what: str) -> dict:
    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"{what} folder not found: {folder}")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UsageError(f"{what} folder has no config.json: {folder}")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} config.json is not valid JSON ({e}): {cfg}") from None


def check_pair(target_cfg: dict, drafter_cfg: dict) -> None:
    """Raise :class:`UsageError` when the drafter cannot run on this target (it shares the target's
    embedding and LM head and reads its layers)."""
    if "dflash_config" not in drafter_cfg or "block_size" not in drafter_cfg:
        raise UsageError("drafter config.json is not a DFlash drafter (no dflash_config / block_size)")
    th, dh = target_cfg.get("hidden_size"), drafter_cfg.get("hidden_size")
    if th != dh:
        raise UsageError(f"drafter hidden size {dh} does not match the target's hidden size {th}")
    tv, dv = target_cfg.get("vocab_size"), drafter_cfg.get("vocab_size")
    if tv != dv:
        raise UsageError(f"drafter vocabulary size {dv} does not match the target's vocabulary size {tv}")
    mask = (drafter_cfg.get("dflash_config") or {}).get("mask_token_id")
    if mask is None or not 0 <= int(mask) < (tv or 0):
        raise UsageError(f"drafter mask_token_id {mask} is not a token of the target's vocabulary")
    layers = target_cfg.get("num_hidden_layers", 0)
    ids = (drafter_cfg.get("dflash_config") or {}).get("target_layer_ids") or []
    bad = [i for i in ids if not 0 <= i < layers]
    if bad:
        raise UsageError(f"drafter reads target layers {bad}, but the target has {layers} layers")


def _device_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda given but no CUDA device is available")
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if args.dtype is None:
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    if args.dtype not in names:
        raise UsageError(f"unknown dtype {args.dtype!r}; choose from {', '.join(names)}")
    if device.startswith("cuda") and names[args.dtype] == torch.float32:
        raise UsageError("--dtype float32 on CUDA: the CUDA kernels run bfloat16 or float16")
    return device, names[args.dtype]


def _load_pair(args, need_drafter: bool):
    """Validate the folders and configs, then load (target runner, drafter or None). Without --target,
    the pair shipped in the package (the demo's) is used."""
    if args.target is None:
        from .demo import PRETRAINED

        if args.drafter is not None:
            raise UsageError("--drafter given without --target")
        args.target, args.drafter = str(PRETRAINED / "target"), str(PRETRAINED / "drafter")
    target_cfg = _read_config(args.target, "target")
    drafter_cfg = None
    if need_drafter:
        if not args.drafter:
            raise UsageError("this method needs --drafter DIR")
        drafter_cfg = _read_config(args.drafter, "drafter")
        check_pair(target_cfg, drafter_cfg)
    device, dtype = _device_dtype(args)
    from transformers.utils import logging as hf_logging

    from .drafter import DFlashDrafter

    hf_logging.disable_progress_bar()  # the stream below is the output; no loading bars around it
    from .target import load_target

    target = load_target(args.target, device=device, dtype=dtype, fast=False if args.no_fast else None)
    drafter = DFlashDrafter.from_pretrained(args.drafter, device=device, dtype=dtype) if need_drafter else None
    return target, drafter


# ---- subcommands -----------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    from . import demo

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        demo.run(prompt=args.prompt if args.prompt is not None else demo.DEMO_PROMPT,
                 max_new_tokens=args.max_new_tokens, max_nodes=args.max_nodes, seed=args.seed, device=device,
                 random=args.random)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    return 0


def cmd_generate(args) -> int:
    if args.method not in METHODS:
        raise UsageError(f"unknown method {args.method!r}; choose from {', '.join(METHODS)}")
    target, drafter = _load_pair(args, need_drafter=args.method != "ar")
    from transformers import AutoTokenizer

    from . import decode

    tok = AutoTokenizer.from_pretrained(args.target)
    ids = tok(args.prompt).input_ids
    if not ids:
        raise UsageError("the prompt encodes to no tokens")
    stops = set() if args.ignore_eos else {t for t in _as_list(tok.eos_token_id) + _as_list(target.config.eos_token_id)}
    cost = None
    if args.cost_model:
        from .cost import CostModel

        cost = CostModel.load(args.cost_model)

    generated: list[int] = []
    printed = [""]

    def stream(row: int, new: list[int]) -> None:
        generated.extend(new)
        text = tok.decode(generated, skip_special_tokens=True)
        if text.startswith(printed[0]):
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    sys.stdout.write(args.prompt)
    res = decode.generate(target, drafter, [ids], method=args.method, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_nodes=args.max_nodes,
                          cost_model=cost, stop_token_ids=sorted(stops), seed=args.seed, on_tokens=stream)
    sizes = [n for r in res.rounds for n in r.tree_size]
    n_tok = len(res.tokens[0])
    print("\n--")
    print(f"method {args.method}: acceptance length {res.acceptance_length:.2f} over {len(res.rounds)} rounds; "
          f"tree size mean {res.mean_tree_size:.1f} (min {min(sizes, default=0)}, max {max(sizes, default=0)}); "
          f"{n_tok} tokens in {res.total_s:.2f} s = {n_tok / max(res.total_s, 1e-9):.1f} tokens/s "
          f"(prefill {res.prefill_s * 1e3:.0f} ms) on {target.device}")
    return 0


def cmd_profile(args) -> int:
    target, drafter = _load_pair(args, need_drafter=bool(args.drafter))
    try:
        from .cost import profile
    except ImportError:
        raise UsageError("cost profiling is not available in this build (ddtree.cost.profile is missing)") from None
    import torch

    contexts = [int(c) for c in args.contexts.split(",")]
    drafter_round = None
    if drafter is not None:
        # One drafter round (a block forward after a one-token context extension) at the first context.
        S = max(contexts) + drafter.block_size + 2
        drafter.reset(1, S)
        F = len(drafter.target_layer_ids) * target.hidden_size
        dev = target.device
        feats = torch.randn(1, max(contexts[0], 1), F, device=dev, dtype=target.dtype)
        target.set_feature_layers(drafter.target_layer_ids)
        drafter.draft(target, torch.zeros(1, dtype=torch.long, device=dev), feats, torch.tensor([contexts[0]], device=dev))
        x, one, zero = torch.zeros(1, dtype=torch.long, device=dev), feats[:, :1], torch.zeros(1, dtype=torch.long, device=dev)
        drafter_round = lambda: drafter.draft(target, x, one, zero)  # noqa: E731
    model = profile(target, drafter_round, max_nodes=args.max_nodes, contexts=contexts, repeats=args.repeats)
    model.save(args.out)
    print(f"cost model written to {args.out} (Cd = {model.draft_cost:.3f} ms)")
    return 0


def cmd_train(args) -> int:
    from . import train

    return train.main(args.rest)


def cmd_bench(args) -> int:
    bench = Path(__file__).resolve().parents[2] / "bench"
    scripts = sorted(p.name for p in bench.glob("*.py")) if bench.is_dir() else []
    print("Benchmarks live in the source tree's bench/ folder; run them with python, e.g.")
    for s in scripts or ["bench_e2e.py", "bench_tree.py", "bench_attention.py"]:
        print(f"  python bench/{s} --help")
    return 0


# ---- parser ----------------------------------------------------------------------------------------


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--no-fast", action="store_true", help="use the Hugging Face runner even where the fast one works")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddtree", description="Speculative decoding with diffusion draft trees.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run every method on the shipped tiny trained pair (no download)")
    p.add_argument("--prompt", default=None, help="text to continue (default: the start of a Python method)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-nodes", type=int, default=64)
    p.add_argument("--random", action="store_true", help="a randomly initialised pair instead of the trained one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate text from a prompt, streaming")
    p.add_argument("--target", help="target model folder (Hugging Face layout, with tokenizer); default: the "
                                    "tiny pair shipped with ddtree (a char-level model of Python code)")
    p.add_argument("--drafter", help="DFlash drafter folder (not needed for --method ar)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--method", default="ddtree", help=f"one of {', '.join(METHODS)} (default ddtree)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-nodes", type=int, default=64, help="tree budget (ddtree) or cap (caddtree)")
    p.add_argument("--cost-model", help="cost model JSON from `ddtree profile` (caddtree; default: an estimate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's end-of-sequence token")
    _common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("profile", help="measure the verification cost curve and write a cost model JSON")
    p.add_argument("--target", help="target model folder (default: the tiny pair shipped with ddtree)")
    p.add_argument("--drafter", help="drafter folder (to measure its round cost; estimated otherwise)")
    p.add_argument("--max-nodes", type=int, default=256)
    p.add_argument("--contexts", default="128,1024,4096", help="comma-separated context lengths")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", required=True, help="output JSON path")
    _common(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("train", help="train the tiny char-level target + DFlash drafter pair (the demo's default)",
                       add_help=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="where the benchmarks are")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its options belong to ddtree.train's own parser
        return cmd_train(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"ddtree: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
