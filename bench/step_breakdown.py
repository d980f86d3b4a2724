"""Where a vLLM engine step's time goes: wall-clock timers around the engine's, the runner's and the
plugin's methods, each region's time counted once (its own time, without the timed regions it calls).

Used by ``bench/bench_vllm.py --breakdown`` in an engine that runs in the calling process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), after vLLM's plugins are loaded so that the plugin's wrappers are
timed too. On CPU every op is synchronous, so a region's wall time is its compute; on CUDA the timers
would need synchronisations and are not meant for it.
"""
from __future__ import annotations

import time
from collections import defaultdict

# (module, class, method) -> the region its own time is counted in. Attention is split by where it runs.
REGIONS = [
    ("vllm.v1.engine.core", "EngineCore", "step", "engine (scheduler glue, outputs)"),
    ("vllm.v1.engine.core", "EngineCore", "post_step", "engine (scheduler glue, outputs)"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "schedule", "scheduler"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output", "scheduler"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "execute_model", "runner other (bookkeeping, logits)"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "sample_tokens", "runner other (bookkeeping, logits)"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_prepare_inputs", "inputs + positions"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_ddtree_plan", "plugin: trees, masks, positions"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_build_attention_metadata", "attention metadata"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_model_forward", "target forward (no attention)"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_sample", "sampling + accept walk"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_ddtree_move_accepted", "KV compaction"),
    ("vllm.v1.spec_decode.llm_base_proposer", "SpecDecodeBaseProposer", "propose", "drafter (no attention)"),
    ("ddtree.vllm.proposer", "DDTreeProposer", "propose", "marginals -> tree"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "forward", "attention"),
    ("ddtree.vllm.attention", "DDTreeAttentionImpl", "forward", "attention"),
    ("ddtree.vllm.cpu_attention", "DDTreeCPUImpl", "forward", "attention"),
]
ORDER = ["scheduler", "engine (scheduler glue, outputs)", "runner other (bookkeeping, logits)", "inputs + positions",
         "plugin: trees, masks, positions", "attention metadata", "target forward (no attention)",
         "target attention", "sampling + accept walk", "KV compaction", "drafter (no attention)",
         "drafter attention", "marginals -> tree"]


class StepTimers:
    def __init__(self):
        self.own = defaultdict(float)  # region -> seconds of its own time
        self.steps = 0  # engine steps that ran the model
        self._stack: list[list] = []  # [region, start, seconds spent in timed callees]

    def _region(self, region: str) -> str:
        if region != "attention":
            return region
        inside = {r for r, _, _ in self._stack}
        return "drafter attention" if "drafter (no attention)" in inside else "target attention"

    def wrap(self, fn, region: str):
        def timed(*args, **kwargs):
            frame = [self._region(region), time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                spent = time.perf_counter() - frame[1]
                self.own[frame[0]] += spent - frame[2]
                if self._stack:
                    self._stack[-1][2] += spent
        timed.__wrapped__ = fn
        return timed

    def install(self) -> "StepTimers":
        import importlib

        for module, cls_name, method, region in REGIONS:
            try:
                cls = getattr(importlib.import_module(module), cls_name)
            except (ImportError, AttributeError):
                continue  # e.g. the plugin's classes when it is not installed
            if method in cls.__dict__:
                setattr(cls, method, self.wrap(cls.__dict__[method], region))
        core = importlib.import_module("vllm.v1.engine.core").EngineCore
        step = core.step

        def counted(engine, *args, **kwargs):
            out = step(engine, *args, **kwargs)
            self.steps += bool(out[1])
            return out

        core.step = counted
        return self

    def reset(self) -> None:
        self.own.clear()
        self.steps = 0

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.steps, 1)
        rows = {r: self.own.get(r, 0.0) * 1e3 / n for r in ORDER}
        rows["total"] = sum(rows.values())
        return rows
