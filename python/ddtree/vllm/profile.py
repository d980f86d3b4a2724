"""CaDDTree's costs measured inside vLLM: what a step of this engine really costs on this machine.

``ddtree profile --vllm --target T --drafter D`` starts a vLLM engine for the pair, laid out as vLLM
serves it (engine core and worker processes, the worker's own thread binding: on a 2-core CPU vLLM keeps
one core for the engine and binds the worker to one thread), sets a fixed tree of ``n`` nodes per request
for each batch size ``B`` and node count ``n`` of a grid, and times every step whose ``B`` requests all
verify a tree of ``n`` nodes, in the worker: the step (the plugin's plan, the target forward over
``B (n + 1)`` rows, sampling and the accept walk, KV moves, the drafter) less the drafter's round, plus
the step's share of what the run spent outside the worker (scheduling, hand-offs, outputs), is
``Cv(B, n)``; the drafter's round (its forward, marginals and tree) is ``Cd(B)``. ``n = 0`` is a plain
decoding step. The same for the drafter's top-1 chains of ``k`` tokens, ``k`` up to its depth: vLLM
verifies those as its own DFlash step, and ``Cv_chain(B, k)`` (the model's ``chain``) lets CaDDTree's
batch mode draft the chain where it is faster than any tree (:mod:`ddtree.chain_choice`). The result is
a :class:`ddtree.cost.CostModel` JSON (batch curves included, so every budget mode reads it), written to the cache the plugin looks in (:func:`cache_path`) and, with ``--out``,
to a file of your choice.

The plugin prices trees with, in order: ``DDTREE_VLLM_COST_MODEL`` (a file), the cached measurement for
this target, drafter, dtype, device, thread count and vLLM version, else the built-in roofline estimate,
which it names in the log as the fallback it is. On CPU every op is synchronous, so wall time is compute;
on a GPU the step ends in vLLM's own host read of the sampled tokens, so a step's wall time is still its
cost (the plugin adds no synchronisation of its own).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

CACHE_ENV = "DDTREE_VLLM_COST_CACHE"
NODE_GRID = (0, 2, 4, 8, 16, 32)
CHAIN_GRID = (1, 2, 4, 8, 16)  # chain lengths below the drafter's depth, which is measured too
BATCH_SIZES = (1, 4, 16, 64)  # up to 64 requests: where no draft at all may be the best choice


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                     os.path.expanduser("~/.cache"), "ddtree", "vllm-costs")
    return Path(base)


def _files_digest(folder: str) -> str:
    """The model folder's identity: its config and the names and sizes of its weight files."""
    h = hashlib.sha256()
    path = Path(folder)
    config = path / "config.json"
    h.update(config.read_bytes() if config.is_file() else str(path.resolve()).encode())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def engine_key(target: str, drafter: str, dtype: str, device: str, threads: int, vllm_version: str) -> dict:
    """What a measurement holds for: the same pair, dtype, device, threads and vLLM."""
    return {"target": _files_digest(target), "drafter": _files_digest(drafter), "dtype": str(dtype).replace("torch.", ""),
            "device": device, "threads": int(threads), "vllm": vllm_version}


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{digest}.json"


def key_of(vllm_config, device) -> dict:
    """The cache key of a running engine (the proposer's vLLM config and device)."""
    import torch
    import vllm

    from ..timing import device_name

    return engine_key(vllm_config.model_config.model, vllm_config.speculative_config.draft_model_config.model,
                      vllm_config.model_config.dtype, device_name(torch.device(device)), torch.get_num_threads(),
                      vllm.__version__)


# ---- in the worker process (sent there by collective_rpc) -------------------------------------------


def _install_clock(worker) -> None:
    """Time every step in this worker: from ``execute_model`` to the end of ``sample_tokens`` (which
    runs the drafter), the drafter's round within it, and the step's shape."""
    runner = worker.model_runner
    if getattr(runner, "_ddtree_clock", None) is not None:
        return
    clock = runner._ddtree_clock = {"steps": [], "current": None}
    execute, sample, propose = runner.execute_model, runner.sample_tokens, runner.drafter.propose

    def timed_execute(scheduler_output, *args, **kwargs):
        spec = scheduler_output.scheduled_spec_decode_tokens
        clock["current"] = {
            "start": time.perf_counter(), "draft_s": 0.0, "reqs": len(scheduler_output.num_scheduled_tokens),
            "tokens": scheduler_output.total_num_scheduled_tokens,
            "prompt": bool(scheduler_output.scheduled_new_reqs) or any(
                n > 1 + len(spec.get(r, ())) for r, n in scheduler_output.num_scheduled_tokens.items())}
        return execute(scheduler_output, *args, **kwargs)

    def timed_sample(*args, **kwargs):
        try:
            return sample(*args, **kwargs)
        finally:
            step, clock["current"] = clock["current"], None
            if step is not None and step["reqs"]:
                step["step_s"] = time.perf_counter() - step.pop("start")
                clock["steps"].append(step)

    def timed_propose(*args, **kwargs):
        t = time.perf_counter()
        try:
            return propose(*args, **kwargs)
        finally:
            if clock["current"] is not None:
                clock["current"]["draft_s"] += time.perf_counter() - t

    runner.execute_model, runner.sample_tokens, runner.drafter.propose = timed_execute, timed_sample, timed_propose


def _set_budget(worker, n: int, chain: bool = False) -> None:
    worker.model_runner.drafter.budget = n
    worker.model_runner.drafter.force_chain = chain


def _take_steps(worker) -> dict:
    import torch

    from ..timing import device_name

    runner = worker.model_runner
    steps, runner._ddtree_clock["steps"] = runner._ddtree_clock["steps"], []
    return {"steps": steps, "depth": runner.drafter.depth, "threads": torch.get_num_threads(),
            "device": device_name(torch.device(runner.device))}


# ---- in the calling process ---------------------------------------------------------------------------


def _kv_bytes_per_token(folder: str, dtype: str) -> int:
    """K and V bytes per token of a Qwen3/Llama-style checkpoint's layers (its config.json)."""
    with open(Path(folder) / "config.json") as f:
        cfg = json.load(f)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    size = 4 if str(dtype).endswith("float32") else 2
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * size


def _monotone(values) -> list[float]:
    """Non-decreasing in n (a larger tree never costs less): the running maximum of the medians."""
    return np.maximum.accumulate(np.asarray(values, dtype=np.float64)).tolist()


def profile_engine(target: str, drafter: str, *, dtype: str = "float32", node_grid=NODE_GRID,
                   batch_sizes=BATCH_SIZES, context: int = 128, steps: int = 6, max_model_len: int = 1024,
                   seed: int = 0, log=print):
    """Measure ``Cv(B, n)`` and ``Cd(B)`` in a vLLM engine laid out as vLLM serves (engine core and worker
    processes, the worker's own thread binding) and return (CostModel, cache key).

    In the worker, each step is timed from ``execute_model`` to the end of ``sample_tokens`` with the
    drafter's round apart; the rest of a step (scheduling, the hand-offs between processes, outputs) is
    each run's wall time less its worker steps, spread evenly over its steps and added to ``Cv``."""
    # The timers are functions sent to the worker: vLLM pickles them only when allowed (this engine is ours).
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ["DDTREE_VLLM_TREE"] = "ddtree"
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    node_grid, batch_sizes = sorted(set(int(n) for n in node_grid)), sorted(set(int(b) for b in batch_sizes))
    if batch_sizes[0] != 1:
        raise ValueError(f"batch_sizes: must start at 1 (the per-request curve), got {batch_sizes}")
    if node_grid[0] < 0:
        raise ValueError(f"node_grid: node counts must be non-negative, got {node_grid}")
    N = max(node_grid[-1], 1)
    # Room for the longest run (prompt, the generated tokens, a tree past them) and a KV cache sized to it,
    # not vLLM's default share of the machine's memory.
    max_model_len = min(max_model_len, context + (steps + 2) * (N + 1) + N + 64)
    kv_bytes = int(1.5 * batch_sizes[-1] * max_model_len * (_kv_bytes_per_token(target, dtype) +
                                                            _kv_bytes_per_token(drafter, dtype))) + (32 << 20)
    llm = LLM(model=target, speculative_config={"method": "dflash", "model": drafter, "num_speculative_tokens": N},
              dtype=dtype, enforce_eager=True, max_num_seqs=batch_sizes[-1], max_model_len=max_model_len, seed=seed,
              max_num_batched_tokens=max(batch_sizes[-1] * (N + 1), context * batch_sizes[-1], 2048),
              kv_cache_memory_bytes=kv_bytes)
    if llm.llm_engine.vllm_config.parallel_config.world_size != 1:
        raise ValueError("ddtree profile --vllm: one worker only (tensor_parallel_size 1)")
    llm.collective_rpc(_install_clock)
    worker = llm.collective_rpc(_take_steps)[0]
    vocab = llm.llm_engine.model_config.get_vocab_size()
    g = torch.Generator().manual_seed(seed)
    warm = [TokensPrompt(prompt_token_ids=torch.randint(3, vocab, (context,), generator=g).tolist()) for _ in range(2)]
    llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)  # warm-up
    llm.collective_rpc(_take_steps)
    depth = worker["depth"]
    chain_grid = [0] + sorted({k for k in CHAIN_GRID if k < depth} | {depth})
    verify = np.zeros((len(batch_sizes), len(node_grid)))
    chain_verify = np.zeros((len(batch_sizes), len(chain_grid)))
    draft = np.zeros(len(batch_sizes))
    measured = []
    # Trees of n nodes, then chains of k tokens (vLLM's own DFlash step verifies those; k = 0 is the same
    # plain step as n = 0).
    runs = [(n, False) for n in node_grid] + [(k, True) for k in chain_grid[1:]]
    for i, B in enumerate(batch_sizes):
        drafts = []
        for n, chain in runs:
            llm.collective_rpc(_set_budget, args=(n, chain))
            prompts = [TokensPrompt(prompt_token_ids=torch.randint(3, vocab, (context,), generator=g).tolist())
                       for _ in range(B)]
            # Each step gives 1 to depth + 1 tokens: enough for `steps` full steps after the prompt's.
            params = SamplingParams(temperature=0.0, max_tokens=(steps + 2) * (min(n, depth) + 1), ignore_eos=True)
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t
            run = llm.collective_rpc(_take_steps)[0]["steps"]
            outside = max(0.0, wall - sum(s["step_s"] for s in run)) / max(len(run), 1)
            full = [s for s in run if s["reqs"] == B and not s["prompt"] and s["tokens"] == B * (n + 1)]
            what = f"{'chains of' if chain else 'trees of'} {n} {'tokens' if chain else 'nodes'}"
            if not full:
                raise RuntimeError(f"no step verified {B} {what} (steps: {run[:4]})")
            cv = float(np.median([s["step_s"] - s["draft_s"] for s in full]) + outside) * 1e3
            cd = float(np.median([s["draft_s"] for s in full])) * 1e3
            if chain:
                chain_verify[i, chain_grid.index(n)] = cv
            else:
                verify[i, node_grid.index(n)] = cv
                drafts.append(cd)
            measured.append({"batch": B, "nodes": n, "chain": chain, "steps": len(full), "verify_ms": cv,
                             "draft_ms": cd, "outside_worker_ms": outside * 1e3})
            log(f"B {B:3d}  {'chain' if chain else 'tree '} {n:4d}: step less drafter {cv:8.2f} ms (of which "
                f"outside the worker {outside * 1e3:5.2f}), drafter {cd:7.2f} ms ({len(full)} steps)")
        draft[i] = float(np.median(drafts))
        chain_verify[i, 0] = verify[i, node_grid.index(0)] if 0 in node_grid else chain_verify[i, 1]
    key = engine_key(target, drafter, dtype, worker["device"], worker["threads"], vllm.__version__)
    model = _batch_model(node_grid, verify, context, batch_sizes, draft,
                         meta={"source": "ddtree profile --vllm (engine steps, wall time)", "key": key,
                               "target": str(target), "drafter": str(drafter), "steps": steps},
                         measured={"engine_steps": measured},
                         chain=_batch_model(chain_grid, chain_verify, context, batch_sizes, draft))
    return model, key


def _batch_model(grid, verify: np.ndarray, context: int, batch_sizes, draft: np.ndarray, **extra):
    """A CostModel of ``verify [S, G]`` (one curve per batch size, made non-decreasing) at one context and
    the drafter's rounds ``draft [S]``."""
    from ..cost import CostModel

    curves = [_monotone(row) for row in verify]
    return CostModel(node_grid=grid, contexts=[context], verify_ms=np.array([curves[0]]), draft_cost=float(draft[0]),
                     batch_sizes=batch_sizes, batch_draft_ms=[float(d) for d in draft[1:]],
                     batch_verify_ms=np.array([[c] for c in curves[1:]]).reshape(len(batch_sizes) - 1, 1, len(grid)),
                     **extra)
