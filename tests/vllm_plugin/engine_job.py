"""Run one vLLM engine on a job and print its results as one JSON line (used by test_vllm_plugin.py).

Each engine runs in a process of its own: vLLM loads the ddtree plugin when its processes start, so
the environment (DDTREE_VLLM_TREE or not) is fixed per engine, and an engine's memory is freed when
its process ends.

    python engine_job.py JOB.json   # prints "RESULT {...}" on success

The job: {"target", "drafter" (or null), "method" (null: no drafting), "num_speculative_tokens",
"dtype", "max_num_seqs", "batches": [{"prompts": [...] or "prompt_token_ids": [[...]],
"sampling": {...} or one {...} per prompt}]}.
The result: per batch the generated token ids and texts, and vLLM's speculative-decoding counters.
"""
import json
import sys


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMError
    from vllm.inputs import TokensPrompt

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
    if spec is not None:  # which proposer the workers built (cloudpickled to them by value)
        result["drafter_class"] = llm.collective_rpc(lambda worker: type(worker.model_runner.drafter).__name__)
    return result


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        job = json.load(f)
    print("RESULT " + json.dumps(run(job)), flush=True)
