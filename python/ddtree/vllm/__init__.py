"""ddtree inside vLLM: DFlash drafts become DDTree / CaDDTree trees, verified in one target forward.

Loaded by vLLM through the ``vllm.general_plugins`` entry point in every process (main, engine core,
workers). It does nothing unless ``DDTREE_VLLM_TREE`` is set, so vLLM behaves exactly as without it:

* ``DDTREE_VLLM_TREE=ddtree``: a tree of ``num_speculative_tokens`` nodes per round (fixed budget);
* ``DDTREE_VLLM_TREE=caddtree``: the cost-aware budget, at most ``num_speculative_tokens`` nodes, priced
  by the cost model in ``DDTREE_VLLM_COST_MODEL`` (a ``ddtree profile`` JSON) or by the roofline default,
  for each request alone or for the step's batch (``DDTREE_VLLM_BUDGET_MODE``: request, batch, ragged).

with ``speculative_config={"method": "dflash", "model": DRAFTER, "num_speculative_tokens": N}``.
Supported: vLLM 0.32.x, V1 model runner, synchronous scheduling, decoder-only targets without M-RoPE;
requests with sampling options beyond temperature/top-k/top-p/seed are refused one by one
(:mod:`ddtree.vllm.admission`). Anything else is refused with one line.
"""
from __future__ import annotations

import os

TREE_ENV = "DDTREE_VLLM_TREE"
COST_ENV = "DDTREE_VLLM_COST_MODEL"
BUDGET_ENV = "DDTREE_VLLM_BUDGET_MODE"
TREE_MODES = ("ddtree", "caddtree")
BUDGET_MODES = ("request", "batch", "ragged")  # build_tree's budget_mode
# The default: vLLM's forward is one padded batch of every request's slots, which batch mode prices; it
# measured best of the three at 1-64 concurrent requests (bench/RESULTS.md, the vLLM sweep).
DEFAULT_BUDGET_MODE = "batch"
SUPPORTED_VLLM = "0.32."  # version prefix this plugin is written against


class PluginError(RuntimeError):
    """The plugin was asked to run somewhere it does not support."""


def check_vllm_version(version: str) -> None:
    if not version.startswith(SUPPORTED_VLLM):
        raise PluginError(f"ddtree.vllm: {TREE_ENV} is set but vLLM {version} is installed; this plugin "
                          f"supports vLLM {SUPPORTED_VLLM}x (V1 model runner) only")


def tree_mode() -> str | None:
    mode = os.environ.get(TREE_ENV, "").strip()
    if not mode:
        return None
    if mode not in TREE_MODES:
        raise PluginError(f"ddtree.vllm: {TREE_ENV}={mode!r}; choose one of {', '.join(TREE_MODES)}")
    return mode


def budget_mode() -> str:
    """CaDDTree's budget mode: what the cost table prices (``ddtree.build_tree``'s ``budget_mode``)."""
    mode = os.environ.get(BUDGET_ENV, "").strip() or DEFAULT_BUDGET_MODE
    if mode not in BUDGET_MODES:
        raise PluginError(f"ddtree.vllm: {BUDGET_ENV}={mode!r}; choose one of {', '.join(BUDGET_MODES)}")
    return mode


def check_config(vllm_config) -> None:
    """Refuse, with one line, a vLLM configuration the tree verifier does not handle."""
    spec = vllm_config.speculative_config
    if spec is None:
        return  # no drafting: nothing to do (the attention backend is exact for plain decoding)
    if spec.method != "dflash":
        raise PluginError(f"ddtree.vllm: {TREE_ENV} needs speculative_config method 'dflash', got {spec.method!r}")
    if vllm_config.scheduler_config.async_scheduling:
        raise PluginError("ddtree.vllm: tree verification needs synchronous scheduling (async_scheduling=False)")
    if vllm_config.model_config.uses_mrope:
        raise PluginError("ddtree.vllm: M-RoPE targets are not supported (tree positions are depth-based)")


def register() -> None:
    """The ``vllm.general_plugins`` entry point."""
    if tree_mode() is None:
        return
    budget_mode()  # a bad value is refused at start-up, in every process
    import vllm

    check_vllm_version(vllm.__version__)
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from . import admission, attention, runner

    if current_platform.is_cpu():  # vLLM's CPU_ATTN, with tree verification added
        register_backend(AttentionBackendEnum.CPU_ATTN, "ddtree.vllm.cpu_attention.DDTreeCPUBackend")
    else:  # every attention call through ddtree's paged op (not yet measured on a GPU)
        attention.DDTreeAttentionBackend._slot_name = "FLASH_ATTN"
        register_backend(AttentionBackendEnum.FLASH_ATTN, "ddtree.vllm.attention.DDTreeAttentionBackend")
    runner.patch()
    admission.patch()  # in the serving process: unsupported sampling options refused per request
