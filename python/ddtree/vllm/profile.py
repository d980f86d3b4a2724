"""CaDDTree's costs measured inside vLLM: what a step of this engine really costs on this machine.

``ddtree profile --vllm --target T --drafter D`` runs the pair in a vLLM engine in this process with a
fixed tree of ``n`` nodes per request, for each batch size ``B`` and node count ``n`` of a grid, and times
every engine step whose ``B`` requests all verify a tree of ``n`` nodes: the step's wall time (scheduler,
runner bookkeeping, the plugin's plan, the target forward over ``B (n + 1)`` rows, sampling and the
accept walk, KV compaction) less the drafter's round is ``Cv(B, n)``; the drafter's round (its forward,
marginals and tree) is ``Cd(B)``. ``n = 0`` is a plain decoding step. The result is a
:class:`ddtree.cost.CostModel` JSON (batch curves included, so every budget mode reads it), written to
the cache the plugin looks in (:func:`cache_path`) and, with ``--out``, to a file of your choice.

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
BATCH_SIZES = (1, 4, 16)


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


def _runner(llm):
    """The model runner of an engine that runs in this process."""
    try:
        return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    except AttributeError as e:
        raise RuntimeError("ddtree profile --vllm: the engine must run in this process "
                           "(VLLM_ENABLE_V1_MULTIPROCESSING=0, one worker)") from e


class _StepClock:
    """Per engine step: wall time, the drafter's round, requests, scheduled tokens and whether a prompt ran."""

    def __init__(self, runner):
        from vllm.v1.engine import core

        self.steps: list[dict] = []
        self._current: dict = {}
        self._undo = []
        step, execute, propose = core.EngineCore.step, type(runner).execute_model, runner.drafter.propose

        def timed_step(engine, *args, **kwargs):
            self._current = {"draft_s": 0.0}
            t = time.perf_counter()
            out = step(engine, *args, **kwargs)
            if out[1] and "reqs" in self._current:
                self.steps.append({**self._current, "step_s": time.perf_counter() - t})
            return out

        def timed_execute(runner_self, scheduler_output, *args, **kwargs):
            self._current.update(reqs=len(scheduler_output.num_scheduled_tokens),
                                 tokens=scheduler_output.total_num_scheduled_tokens,
                                 prompt=bool(scheduler_output.scheduled_new_reqs) or any(
                                     n > 1 + len(scheduler_output.scheduled_spec_decode_tokens.get(r, ()))
                                     for r, n in scheduler_output.num_scheduled_tokens.items()))
            return execute(runner_self, scheduler_output, *args, **kwargs)

        def timed_propose(*args, **kwargs):
            t = time.perf_counter()
            try:
                return propose(*args, **kwargs)
            finally:
                self._current["draft_s"] = self._current.get("draft_s", 0.0) + time.perf_counter() - t

        self._undo = [(owner, name, owner.__dict__.get(name)) for owner, name in
                      ((core.EngineCore, "step"), (type(runner), "execute_model"))]
        core.EngineCore.step = timed_step
        type(runner).execute_model = timed_execute
        runner.drafter.propose = timed_propose
        self._drafter = runner.drafter

    def close(self) -> None:
        for owner, name, fn in self._undo:
            if fn is None:
                delattr(owner, name)  # it was inherited
            else:
                setattr(owner, name, fn)
        del self._drafter.propose  # the instance attribute; the class's method shows again


def _monotone(values) -> list[float]:
    """Non-decreasing in n (a larger tree never costs less): the running maximum of the medians."""
    return np.maximum.accumulate(np.asarray(values, dtype=np.float64)).tolist()


def profile_engine(target: str, drafter: str, *, dtype: str = "float32", node_grid=NODE_GRID,
                   batch_sizes=BATCH_SIZES, context: int = 128, steps: int = 6, max_model_len: int = 1024,
                   seed: int = 0, log=print):
    """Measure ``Cv(B, n)`` and ``Cd(B)`` in a vLLM engine (this process) and return the CostModel."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["DDTREE_VLLM_TREE"] = "ddtree"
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ..cost import CostModel

    node_grid, batch_sizes = sorted(set(int(n) for n in node_grid)), sorted(set(int(b) for b in batch_sizes))
    if batch_sizes[0] != 1:
        raise ValueError(f"batch_sizes: must start at 1 (the per-request curve), got {batch_sizes}")
    if node_grid[0] < 0:
        raise ValueError(f"node_grid: node counts must be non-negative, got {node_grid}")
    N = max(node_grid[-1], 1)
    llm = LLM(model=target, speculative_config={"method": "dflash", "model": drafter, "num_speculative_tokens": N},
              dtype=dtype, enforce_eager=True, max_num_seqs=batch_sizes[-1], max_model_len=max_model_len, seed=seed,
              max_num_batched_tokens=max(batch_sizes[-1] * (N + 1), context * batch_sizes[-1], 2048))
    runner = _runner(llm)
    proposer = runner.drafter
    depth = proposer.depth
    vocab = llm.llm_engine.model_config.get_vocab_size()
    g = torch.Generator().manual_seed(seed)
    clock = _StepClock(runner)
    verify = np.zeros((len(batch_sizes), len(node_grid)))
    draft = np.zeros(len(batch_sizes))
    measured = []
    try:
        for i, B in enumerate(batch_sizes):
            drafts = []
            for j, n in enumerate(node_grid):
                proposer.budget = n
                prompts = [TokensPrompt(prompt_token_ids=torch.randint(3, vocab, (context,), generator=g).tolist())
                           for _ in range(B)]
                # Each step gives 1 to depth + 1 tokens: enough for `steps` full steps and the prompt's.
                params = SamplingParams(temperature=0.0, max_tokens=(steps + 2) * (min(n, depth) + 1), ignore_eos=True)
                clock.steps.clear()
                llm.generate(prompts, params, use_tqdm=False)
                full = [s for s in clock.steps if s["reqs"] == B and not s["prompt"] and s["tokens"] == B * (n + 1)]
                if not full:
                    raise RuntimeError(f"no step verified {B} trees of {n} nodes (steps: {clock.steps[:4]})")
                cv = float(np.median([(s["step_s"] - s["draft_s"]) * 1e3 for s in full]))
                cd = float(np.median([s["draft_s"] * 1e3 for s in full]))
                verify[i, j] = cv
                drafts.append(cd)
                measured.append({"batch": B, "nodes": n, "steps": len(full), "verify_ms": cv, "draft_ms": cd})
                log(f"B {B:3d}  n {n:4d}: step less drafter {cv:8.2f} ms, drafter {cd:7.2f} ms ({len(full)} steps)")
            draft[i] = float(np.median(drafts))
    finally:
        clock.close()
    curves = [_monotone(row) for row in verify]
    from ..timing import device_name

    key = engine_key(target, drafter, dtype, device_name(torch.device(runner.device)), torch.get_num_threads(),
                     vllm.__version__)
    model = CostModel(node_grid=node_grid, contexts=[context], verify_ms=np.array([curves[0]]),
                      draft_cost=float(draft[0]), batch_sizes=batch_sizes,
                      batch_verify_ms=np.array([[c] for c in curves[1:]]).reshape(len(batch_sizes) - 1, 1, len(node_grid)),
                      batch_draft_ms=[float(d) for d in draft[1:]],
                      meta={"source": "ddtree profile --vllm (engine steps, wall time)", "key": key,
                            "target": str(target), "drafter": str(drafter), "steps": steps},
                      measured={"engine_steps": measured})
    return model, key
