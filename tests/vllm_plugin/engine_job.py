"""Run one vLLM engine on a job and print its results as one JSON line (used by test_vllm_plugin.py).

Each engine runs in a process of its own: vLLM loads the ddtree plugin when its processes start, so
the environment (DDTREE_VLLM_TREE or not) is fixed per engine, and an engine's memory is freed when
its process ends.

    python engine_job.py JOB.json   # prints "RESULT {...}" on success

The job: {"target", "drafter" (or null), "method" (null: no drafting), "num_speculative_tokens",
"dtype", "max_num_seqs", "batches": [{"prompts": [...] or "prompt_token_ids": [[...]],
"sampling": {...} or one {...} per prompt}]}.
The result: per batch the generated token ids and texts, and vLLM's speculative-decoding counters.
With "count_host_syncs": true (and VLLM_ENABLE_V1_MULTIPROCESSING=0, so the engine steps in this process)
also "host_syncs": per engine step, the calls that read a tensor's value on the host (tolist, item, bool,
int, float, numpy, cpu) made from the plugin's code.
"""
import json
import sys
from pathlib import Path

_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


def count_host_syncs() -> list:
    """Wrap the torch.Tensor methods that read values to the host; count the calls whose caller is in
    ddtree/vllm/, per engine step. Returns the list the counts go into."""
    import torch
    from vllm.plugins import load_general_plugins
    from vllm.v1.engine import core

    import ddtree.vllm

    load_general_plugins()
    plugin_dir = str(Path(ddtree.vllm.__file__).parent)
    counts, current = [], [0]

    def counted(fn):
        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(plugin_dir):
                current[0] += 1
            return fn(self, *args, **kwargs)
        return wrapper

    for name in _READS:
        setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    step = core.EngineCore.step

    def stepped(engine, *args, **kwargs):
        current[0] = 0
        out = step(engine, *args, **kwargs)
        if out[1]:
            counts.append(current[0])
        return out

    core.EngineCore.step = stepped
    return counts


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMError
    from vllm.inputs import TokensPrompt

    host_syncs = count_host_syncs() if job.get("count_host_syncs") else None
    spec = None
    if job.get("method"):
        spec = {"method": job["method"], "model": job["drafter"],
                "num_speculative_tokens": job["num_speculative_tokens"]}
    llm = LLM(model=job["target"], speculative_config=spec, dtype=job.get("dtype", "float32"),
              max_model_len=job.get("max_model_len", 512), enforce_eager=True,
              max_num_seqs=job.get("max_num_seqs", 8), seed=job.get("seed", 0),
              kv_cache_memory_bytes=job.get("kv_cache_bytes", 64 << 20), disable_log_stats=False,
              tensor_parallel_size=job.get("tensor_parallel_size", 1))
    batches = []
    for batch in job["batches"]:
        sampling = batch["sampling"]  # one dict for the batch, or one per prompt
        params = [SamplingParams(**x) for x in sampling] if isinstance(sampling, list) else SamplingParams(**sampling)
        if "prompt_token_ids" in batch:
            prompts = [TokensPrompt(prompt_token_ids=ids) for ids in batch["prompt_token_ids"]]
        else:
            prompts = batch["prompts"]
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        except (ValueError, VLLMError) as e:  # a refused request
            if not job.get("refusals_ok"):
                raise
            batches.append({"refused": str(e)})
            continue
        batches.append({"token_ids": [list(o.outputs[0].token_ids) for o in outs],
                        "texts": [o.outputs[0].text for o in outs],
                        "finish_reasons": [o.outputs[0].finish_reason for o in outs]})
    metrics = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            metrics[m.name] = getattr(m, "values", None) or getattr(m, "value", None)
    result = {"batches": batches, "metrics": metrics}
    if host_syncs is not None:
        result["host_syncs"] = host_syncs
    if spec is not None:  # which proposer the workers built (cloudpickled to them by value)
        result["drafter_class"] = llm.collective_rpc(lambda worker: type(worker.model_runner.drafter).__name__)
        # DDTree's drafting rounds of each kind (tree, or CaDDTree's top-1 chain), where the proposer counts them.
        result["rounds"] = llm.collective_rpc(lambda worker: getattr(worker.model_runner.drafter, "rounds", None))
    return result


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        job = json.load(f)
    print("RESULT " + json.dumps(run(job)), flush=True)
