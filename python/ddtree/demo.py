"""``ddtree demo``: every method on a tiny pair, with what happened; nothing is downloaded.

The default pair ships in the package (``pretrained/stdlib-char``): a character-level Qwen3 target and
two DFlash drafters for it (block sizes 8 and 16), trained on the Python standard library's source by
:mod:`ddtree.train`. ``--random`` builds a random pair instead (:func:`ddtree.tiny.make_pair`).

CaDDTree's cost model is measured here, for this pair on this machine (:func:`demo_cost_model`), and cached:
on a model this small a round's fixed steps (drafter, tree build, acceptance, the host's synchronisation,
Python) cost as much as its verify, and a cost model that leaves them out sizes trees for a round that
does not exist.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from .drafter import DFlashDrafter
from .tiny import make_pair

PRETRAINED = Path(__file__).resolve().parent / "pretrained" / "stdlib-char"  # target/, drafters, train_info.json
DRAFTERS = {8: "drafter", 16: "drafter-b16"}  # the shipped drafters of the target, by block size
# The demo's drafter: with block 16 the trees pay (held-out acceptance: chain 6.29, DDTree-64 8.47, against
# 4.66 and 5.82 with block 8; CaDDTree 1.16x the chain's tokens/s on a loaded 2-core CPU, block 8 1.02x):
# bench/RESULTS.md, "The block-16 drafter for the shipped target".
DEMO_DRAFTER_BLOCK = 16
DEMO_PROMPT = "    def __init__(self, "
TIMED_RUNS = 3  # each method's tokens/s is the median of this many decodes, after one untimed warm-up


def pretrained_pair(block_size: int = 8) -> tuple[Path, Path]:
    """The shipped trained pair's (target folder, drafter folder), the drafter of ``block_size`` (8 or 16)."""
    if block_size not in DRAFTERS:
        raise ValueError(f"block_size: the shipped drafters have block sizes {', '.join(map(str, DRAFTERS))}, "
                         f"got {block_size!r}")
    drafter = PRETRAINED / DRAFTERS[block_size]
    if not (PRETRAINED / "target" / "config.json").is_file():
        raise FileNotFoundError(f"the trained demo pair is missing from this install ({PRETRAINED}); "
                                "train it with `ddtree train --out DIR` or use `ddtree demo --random`")
    if not (drafter / "config.json").is_file():
        raise FileNotFoundError(f"the shipped drafter of block size {block_size} is missing from this install "
                                f"({drafter}); train it with `ddtree train --target {PRETRAINED / 'target'} "
                                f"--block-size {block_size} --out {drafter}`")
    return PRETRAINED / "target", drafter


def _files_digest(*folders: Path) -> str:
    h = hashlib.sha256()
    for folder in folders:
        for name in ("config.json", "model.safetensors"):
            path = Path(folder) / name
            h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()


def demo_cost_model(target, drafter, prompt_ids: list[int], max_new_tokens: int, max_nodes: int,
                    folders: tuple[Path, Path], cache: bool = True):
    """CaDDTree's cost model for this pair on this device: ``(model, where it came from)``.

    ``Cv(n; l)``: the target runner's verify, profiled (:func:`ddtree.cost.profile`) for ``n`` up to
    ``max_nodes`` at the contexts this demo decodes at. ``Cd``: everything else a round costs, measured on
    real CaDDTree decodes of the prompt (:func:`ddtree.cost.round_overhead_ms`: the rounds' time less their
    verify forwards; the median of three decodes after a warm-up). Measured, not estimated, because it is
    this machine's Python and dispatch overhead that sets the price of a round here; measured at every
    install, not shipped, because that price differs from machine to machine. Cached under
    ``$DDTREE_CACHE_DIR`` (default ``~/.cache/ddtree``)``/demo_cost/``, keyed by the device, torch and
    ddtree versions, torch's threads, the dtype, both models' files and the decode's shape; delete the file
    to measure again.
    """
    from . import __version__, decode
    from .cost import CostModel, profile, round_overhead_ms
    from .timing import _cache_dir, device_name

    contexts = [len(prompt_ids), len(prompt_ids) + max_new_tokens]
    key = json.dumps({"device": device_name(target.device), "torch": torch.__version__, "ddtree": __version__,
                      "threads": torch.get_num_threads(), "dtype": str(target.dtype), "models": _files_digest(*folders),
                      "contexts": contexts, "max_nodes": max_nodes}, sort_keys=True)
    path = _cache_dir() / "demo_cost" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache and path.is_file():
        try:
            return CostModel.load(path), f"cached in {path}"
        except ValueError:
            pass  # a damaged cache file is measured again
    t0 = time.perf_counter()
    model = profile(target, None, max_nodes=max_nodes, contexts=contexts, warmup=2, repeats=5, progress=False)
    runs = [decode.generate(target, drafter, [prompt_ids], method="caddtree", max_new_tokens=max_new_tokens,
                            max_nodes=max_nodes, cost_model=model, threads=None) for _ in range(4)]
    model.draft_cost = statistics.median(round_overhead_ms(r) for r in runs[1:])
    model.meta["source"] = ("demo profile: Cv profiled; Cd = a real CaDDTree round's time beyond its verify "
                            "(cost.round_overhead_ms)")
    model.meta["demo_key"] = json.loads(key)
    where = f"measured now in {time.perf_counter() - t0:.1f} s"
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            model.save(path)
            where += f", cached in {path}"
        except OSError:
            pass  # a read-only home only costs a measurement next time
    return model, where


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
        device: str = "cpu", random: bool = False, threads: Optional[int] = 1, drafter_block: int = DEMO_DRAFTER_BLOCK,
        cost_model=None, out=print) -> dict:
    """Run every method on ``prompt`` with the shipped trained pair (or a random one) and print what happened.

    ``threads``: torch's CPU threads on CPU (None: torch's default). ``drafter_block``: which shipped
    drafter (8 or 16; with ``random``, the random drafter's block size). ``cost_model``: CaDDTree's
    (default: :func:`demo_cost_model`, measured here and cached). Returns ``{method: GenerateOutput}`` (the
    last timed decode of each) and ``"cost_model"``: the model CaDDTree used.
    """
    import contextlib

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from . import decode, ops
    from .target import load_target

    if drafter_block not in DRAFTERS:
        raise ValueError(f"drafter_block: the shipped drafters have block sizes {', '.join(map(str, DRAFTERS))}, "
                         f"got {drafter_block!r}")
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
            # head size 64: a size the CUDA kernels take
            tdir, ddir = make_pair(tmp, seed=seed, block_size=drafter_block, head_dim=64)
        else:
            tdir, ddir = pretrained_pair(drafter_block)
            out("ddtree demo: the tiny pair shipped with ddtree (a character-level Qwen3 target and its DFlash")
            out(f"drafter of block size {drafter_block}, trained offline on the Python standard library by "
                "`ddtree train`; nothing downloaded).")
        tok = AutoTokenizer.from_pretrained(tdir)
        target = load_target(tdir, device=dev, dtype=dtype)
        drafter = DFlashDrafter.from_pretrained(ddir, device=dev, dtype=target.dtype)
        ids = tok(prompt).input_ids
        if cost_model is None:
            cost_model, where = demo_cost_model(target, drafter, ids, max_new_tokens, max_nodes, (tdir, ddir),
                                                cache=not random)
        else:
            where = "given"
        cv = cost_model.verify_cost([0, drafter.block_size - 1, max_nodes], len(ids))
        out(f"device {dev}, {target.dtype}; prompt {prompt!r}; up to {max_new_tokens} new tokens; "
            f"DDTree budget and CaDDTree cap {max_nodes} nodes")
        out(f"CaDDTree's cost model ({where}): a round's fixed steps Cd = {cost_model.draft_cost:.2f} ms, "
            f"verify Cv(0 / {drafter.block_size - 1} / {max_nodes} nodes) = {cv[0]:.2f} / {cv[1]:.2f} / {cv[2]:.2f} ms")
        out(f"tokens/s: the median of {TIMED_RUNS} decodes after a warm-up, the methods taking turns\n")
        rates = {method: [] for method in decode.METHODS}
        # Round-robin, so that load from other processes (a shared machine) falls on every method alike.
        for i in range(TIMED_RUNS + 1):  # the first is a warm-up: allocations, CUDA graphs, cost tables
            for method in decode.METHODS:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = decode.generate(target, drafter, [ids], method=method, max_new_tokens=max_new_tokens,
                                      max_nodes=max_nodes, cost_model=cost_model, seed=seed, threads=None)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    rates[method].append(len(res.tokens[0]) / (time.perf_counter() - t0))
                results[method] = res
        for method in decode.METHODS:
            res = results[method]
            same = "" if method == "ar" else (
                "  (same tokens as ar)" if res.tokens == results["ar"].tokens else "  (DIFFERS FROM ar!)")
            out(f"[{method:8s}] acceptance length {res.acceptance_length:5.2f}  mean tree size "
                f"{res.mean_tree_size:5.1f}  {statistics.median(rates[method]):7.1f} tokens/s{same}")
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
    results["cost_model"] = cost_model
    return results
