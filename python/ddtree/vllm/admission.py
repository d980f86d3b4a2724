"""Refuse, per request and before it reaches the engine, the sampling options tree verification ignores.

The tree verifier draws each slot's token from the target's distribution after temperature, top-k and
top-p only. A request asking for more (penalties, min_p, logit_bias, min_tokens, allowed or bad words, a
grammar, logprobs) would silently get other tokens than the target alone would give, so it is refused
where vLLM validates requests (``InputProcessor._validate_params``, in the serving process): the caller
gets vLLM's validation error naming the option; the engine and the other requests carry on.
"""
from __future__ import annotations

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.engine import input_processor


def unsupported_options(params: SamplingParams) -> list[str]:
    """The options of ``params`` that tree verification would not honour."""
    used = {
        "presence_penalty": params.presence_penalty != 0.0,
        "frequency_penalty": params.frequency_penalty != 0.0,
        "repetition_penalty": params.repetition_penalty != 1.0,
        "min_p": params.min_p > 0.0,
        "logit_bias": bool(params.logit_bias),
        "min_tokens": params.min_tokens > 0,
        "allowed_token_ids": params.allowed_token_ids is not None,
        "bad_words": bool(params.bad_words),
        "structured_outputs": params.structured_outputs is not None,
        "logprobs": params.logprobs is not None,
    }
    return [name for name, on in used.items() if on]


def _validate_params(orig):
    def wrapped(self, params, *args, **kwargs):
        spec = self.speculative_config
        if isinstance(params, SamplingParams) and spec is not None and spec.method == "dflash":
            names = unsupported_options(params)
            if names:
                raise VLLMValidationError(
                    f"ddtree.vllm (DDTREE_VLLM_TREE): {', '.join(names)} not supported with tree verification",
                    parameter=names[0])
        return orig(self, params, *args, **kwargs)

    return wrapped


_PATCHED = False


def patch() -> None:
    global _PATCHED
    if not _PATCHED:
        cls = input_processor.InputProcessor
        cls._validate_params = _validate_params(cls._validate_params)
        _PATCHED = True
