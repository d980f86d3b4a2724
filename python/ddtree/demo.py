"""``ddtree demo``: every method on a tiny pair, with what happened; nothing is downloaded.

The default pair ships in the package (``pretrained/stdlib-char``): a character-level Qwen3 target and
its DFlash drafter, trained on the Python standard library's source by :mod:`ddtree.train`.
``--random`` builds a random pair instead (:func:`ddtree.tiny.make_pair`).
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from .drafter import DFlashDrafter
from .tiny import make_pair

PRETRAINED = Path(__file__).resolve().parent / "pretrained" / "stdlib-char"  # target/, drafter/, train_info.json
DEMO_PROMPT = "    def __init__(self, "


def pretrained_pair() -> tuple[Path, Path]:
    """The shipped trained pair's (target folder, drafter folder)."""
    if not (PRETRAINED / "target" / "config.json").is_file():
        raise FileNotFoundError(f"the trained demo pair is missing from this install ({PRETRAINED}); "
                                "train it with `ddtree train --out DIR` or use `ddtree demo --random`")
    return PRETRAINED / "target", PRETRAINED / "drafter"


def format_tree(tree, tokenizer=None, row: int = 0) -> str:
    """An indented rendering of one request's draft tree: token, conditional probability, path probability.

    Host-side and for display only (it loops over the tree's nodes, which the decode loop never does).
    """
    n = int(tree.num_nodes[row])
    tokens, parents = tree.tokens[row].tolist(), tree.parents[row].tolist()
    scores = tree.scores[row].tolist()
    children: dict[int, list[int]] = {}
    for s in range(1, n + 1):
        children.setdefault(parents[s], []).append(s)
    show = (lambda t: repr(tokenizer.convert_ids_to_tokens(t))) if tokenizer is not None else str
    lines = [f"root {show(tokens[0])}"]

    def walk(slot: int, indent: int) -> None:
        for c in children.get(slot, []):
            cond = math.exp(scores[c] - (scores[slot] if slot else 0.0))
            lines.append(f"{'  ' * indent}{show(tokens[c])}  p={cond:.3f}  path={math.exp(scores[c]):.3f}")
            walk(c, indent + 1)

    walk(0, 1)
    return "\n".join(lines)


def run(prompt: str = DEMO_PROMPT, max_new_tokens: int = 96, max_nodes: int = 64, seed: int = 0,
        device: str = "cpu", random: bool = False, threads: Optional[int] = 1, out=print) -> dict:
    """Run every method on ``prompt`` with the shipped trained pair (or a random one) and print what happened.
    ``threads``: torch's CPU threads on CPU (None: torch's default)."""
    import contextlib

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from . import decode, ops
    from .target import load_target

    hf_logging.disable_progress_bar()
    dev = torch.device(device)
    if dev.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)  # 1 by default: a model this small only loses time to thread hand-offs
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    results = {}
    with contextlib.ExitStack() as stack:
        if random:
            out("ddtree demo: a tiny RANDOMLY initialised target and drafter (built here, nothing downloaded).")
            out("The drafter's guesses are random, so expect an acceptance length of about 1 and gibberish text.")
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="ddtree-demo-"))
            tdir, ddir = make_pair(tmp, seed=seed, block_size=8, head_dim=64)  # 64: a head size the CUDA kernels take
        else:
            tdir, ddir = pretrained_pair()
            out("ddtree demo: the tiny pair shipped with ddtree (a character-level Qwen3 target and its DFlash")
            out("drafter, trained offline on the Python standard library by `ddtree train`; nothing downloaded).")
        tok = AutoTokenizer.from_pretrained(tdir)
        target = load_target(tdir, device=dev, dtype=dtype)
        drafter = DFlashDrafter.from_pretrained(ddir, device=dev, dtype=target.dtype)
        ids = tok(prompt).input_ids
        cost = decode.default_cost_model(target)
        out(f"device {dev}, {target.dtype}; prompt {prompt!r}; up to {max_new_tokens} new tokens; "
            f"DDTree budget and CaDDTree cap {max_nodes} nodes\n")
        for method in decode.METHODS:
            if dev.type == "cuda":  # warm-up at the same cache size: allocations, CUDA graphs, cost tables
                decode.generate(target, drafter, [ids], method=method, max_new_tokens=max_new_tokens,
                                max_nodes=max_nodes, cost_model=cost, seed=seed, threads=None)
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = decode.generate(target, drafter, [ids], method=method, max_new_tokens=max_new_tokens,
                                  max_nodes=max_nodes, cost_model=cost, seed=seed, threads=None)
            dt = time.perf_counter() - t0
            results[method] = res
            same = "" if method == "ar" else (
                "  (same tokens as ar)" if res.tokens == results["ar"].tokens else "  (DIFFERS FROM ar!)")
            out(f"[{method:8s}] acceptance length {res.acceptance_length:5.2f}  mean tree size "
                f"{res.mean_tree_size:5.1f}  {len(res.tokens[0]) / dt:7.1f} tokens/s{same}")
        same_all = all(r.tokens == results["ar"].tokens for r in results.values())
        out("\ngenerated (greedy; " + ("identical for every method):" if same_all else "ar's output):"))
        out(prompt + tok.decode(results["ar"].tokens[0]))

        # One draft tree, rendered: the DDTree a round would verify right after the prompt.
        target.set_feature_layers(drafter.target_layer_ids)
        cap = len(ids) + drafter.block_size + max_nodes + 2
        target.reset(1, cap)
        drafter.reset(1, cap)
        prompt_ids = torch.tensor([ids], device=target.device)
        lengths = torch.tensor([len(ids)], device=target.device)
        logits, feats = target.prefill(prompt_ids, lengths)
        x = logits.argmax(-1)
        dl = drafter.draft(target, x, feats, lengths)
        lp, tid = ops.topk_marginals(dl, min(4, dl.shape[-1]))
        tree = ops.build_tree(lp, tid, x, target.context_lens, 12)
        out("\nthe first round's draft tree (DDTree, 12 nodes, top-4 per depth): token, p(token | parent), "
            "path probability")
        out(format_tree(tree.to("cpu"), tok))
    return results
