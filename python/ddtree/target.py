"""The target model behind the decode loop: the ``TargetRunner`` interface and its Hugging Face runner.

Two runners implement the same duck-typed interface: :class:`HFTarget` here (any Hugging Face causal LM
whose attention goes through transformers' ``AttentionInterface``; used for correctness and on CPU) and
``ddtree.fast_target.FastTarget`` (Llama/Qwen3 family, static cache, CUDA graphs) which
:func:`load_target` prefers on CUDA. Shapes: ``B`` requests, ``L`` prompt length (right-padded), ``T``
tree slots, ``V`` vocabulary, ``H`` hidden size, ``F = len(feature_layer_ids) * H``, ``S`` cache capacity.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Protocol, runtime_checkable

import torch

from . import hf_attention
from .fast_target import FastTarget
from .ops import DraftTree, compact_kv


@runtime_checkable
class TargetRunner(Protocol):
    """What the decode loop needs from a target model (both runners implement it; see the module doc)."""

    config: object  # the Hugging Face PretrainedConfig of the target
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    feature_layer_ids: list[int]
    context_lens: torch.Tensor  # [B] i64 on device: committed tokens in the KV cache
    max_len: int  # cache capacity S

    def set_feature_layers(self, layer_ids: list[int]) -> None:
        """Which decoder layers' outputs ``prefill``/``verify`` return as features (in this order)."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embedding: ids ``[...]`` i64 -> ``[..., H]`` in ``dtype``."""

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head only (no final norm): ``[..., H]`` -> logits ``[..., V]`` f32."""

    def reset(self, batch_size: int, max_len: int) -> None:
        """Allocate the static KV cache ``[B, Hkv, max_len, d]`` per layer; ``context_lens = 0``."""

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids ``[B, L]`` i64 right-padded, lengths ``[B]`` i64 -> (logits ``[B, V]`` f32 at each
        request's last prompt token, features ``[B, L, F]``). Writes K/V at ``0..len-1``; ``context_lens = lengths``."""

    def verify(self, tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over the ``T`` tree slots -> (logits ``[B, T, V]`` f32, features ``[B, T, F]``).
        Writes the slots' K/V at ``context_lens + slot``; ``context_lens`` unchanged."""

    def commit(self, accepted_slots: torch.Tensor, accept_len: torch.Tensor) -> None:
        """``compact_kv`` over every layer's K and V, then ``context_lens += accept_len``.
        accepted_slots ``[B, D+1]`` i64 (-1 padded), accept_len ``[B]`` i32."""


class HFTarget:
    """:class:`TargetRunner` over a stock Hugging Face causal LM (``model.get_decoder().layers``).

    The model's own decoder runs unchanged; only its attention is swapped for ``ddtree_tree`` during our
    forwards (``hf_attention.use_tree_attention``), which reads our static cache and the tree metadata
    from the forward's kwargs. Features are captured with forward hooks on the chosen decoder layers
    (the raw layer outputs, before the final norm, for every layer including the last).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.config = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.hidden_size = self.config.hidden_size
        self.num_hidden_layers = self.config.num_hidden_layers
        self._layers = model.get_decoder().layers
        attn = self._layers[0].self_attn
        self._num_kv_heads = self.config.num_key_value_heads
        self._head_dim = attn.head_dim
        self.feature_layer_ids: list[int] = []
        self._hooks: list = []
        self._captured: dict[int, torch.Tensor] = {}
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.context_lens = torch.zeros(0, dtype=torch.long, device=self.device)
        self.max_len = 0

    # ---- interface -------------------------------------------------------------------------------

    def set_feature_layers(self, layer_ids: list[int]) -> None:
        for h in self._hooks:
            h.remove()
        bad = [i for i in layer_ids if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"feature layers {bad} out of range for a target with {self.num_hidden_layers} layers")
        self.feature_layer_ids = list(layer_ids)
        self._hooks = [self._layers[i].register_forward_hook(self._capture_hook(i)) for i in set(layer_ids)]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden).float()

    def reset(self, batch_size: int, max_len: int) -> None:
        shape = (batch_size, self._num_kv_heads, max_len, self._head_dim)
        mk = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        self.k_cache = [mk() for _ in range(self.num_hidden_layers)]
        self.v_cache = [mk() for _ in range(self.num_hidden_layers)]
        self.context_lens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.max_len = max_len

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = input_ids.shape
        positions = torch.arange(L, device=self.device).expand(B, L)
        state = hf_attention.TreeAttentionState(self.k_cache, self.v_cache, positions, self.context_lens, None, None)
        hidden, features = self._forward(input_ids, positions, state)
        last = (lengths.to(self.device) - 1).clamp(min=0)
        logits = self.lm_head(hidden[torch.arange(B, device=self.device), last])
        self.context_lens = lengths.to(device=self.device, dtype=torch.long).clone()
        return logits, features

    @torch.inference_mode()
    def verify(self, tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
        T = tree.num_slots
        write = self.context_lens[:, None] + torch.arange(T, device=self.device)
        state = hf_attention.TreeAttentionState(
            self.k_cache, self.v_cache, write, self.context_lens, tree.tree_mask, tree.num_nodes
        )
        hidden, features = self._forward(tree.tokens, tree.positions, state)
        return self.lm_head(hidden), features

    @torch.inference_mode()
    def commit(self, accepted_slots: torch.Tensor, accept_len: torch.Tensor) -> None:
        compact_kv(self.k_cache + self.v_cache, self.context_lens, accepted_slots, accept_len)
        self.context_lens += accept_len.to(torch.long)

    # ---- internals -------------------------------------------------------------------------------

    def _capture_hook(self, layer_id: int):
        def hook(module, args, output):
            self._captured[layer_id] = output[0] if isinstance(output, tuple) else output

        return hook

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder forward: ids/positions ``[B, T]`` -> (final-normed hidden ``[B, T, H]``, features ``[B, T, F]``)."""
        self._captured.clear()
        with hf_attention.use_tree_attention(self.model):
            out = self.model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False, ddtree=state)
        hidden = out.last_hidden_state
        if self.feature_layer_ids:
            features = torch.cat([self._captured[i] for i in self.feature_layer_ids], dim=-1)
        else:
            features = hidden.new_empty((*hidden.shape[:-1], 0))
        self._captured.clear()
        return hidden, features


def _fast_runner(source, device, dtype):
    """The hook for the fast runner (``ddtree.fast_target.FastTarget``): ``from_pretrained(path, device=,
    dtype=)`` for a folder, ``from_model(model)`` for a loaded model (its device and dtype).
    ``None`` when it does not support the checkpoint (the HF runner is used then)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            return FastTarget.from_pretrained(str(source), device=device, dtype=dtype)
        if not FastTarget.supports(source.config):
            return None
        return FastTarget.from_model(source)
    except Exception as e:  # an unsupported checkpoint must not stop decoding: fall back, loudly
        warnings.warn(f"fast target runner unavailable ({type(e).__name__}: {e}); using the Hugging Face runner")
        return None


def _wants_fast(fast: Optional[bool], config, device: torch.device) -> bool:
    """``fast`` when given; by default the fast runner on CUDA for every checkpoint it supports."""
    if fast is not None:
        return fast
    if device.type != "cuda":
        return False
    return FastTarget.supports(config)


def as_target(model, fast: Optional[bool] = None) -> TargetRunner:
    """A runner for ``model``: returned as is when it already is one; a Hugging Face model gets the fast
    runner when ``fast`` is True, or when ``fast`` is None and it is a supported model on CUDA, else
    :class:`HFTarget`."""
    if not isinstance(model, torch.nn.Module) and isinstance(model, TargetRunner):
        return model
    device = next(model.parameters()).device
    if _wants_fast(fast, model.config, device):
        runner = _fast_runner(model, device, next(model.parameters()).dtype)
        if runner is not None:
            return runner
    return HFTarget(model)


def load_target(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fast: Optional[bool] = None,
) -> TargetRunner:
    """Load a causal LM from a local folder as a runner (fast runner on CUDA when supported, see :func:`as_target`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device)
    config = AutoConfig.from_pretrained(path)
    if _wants_fast(fast, config, device):
        runner = _fast_runner(path, device, dtype)
        if runner is not None:
            return runner
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return HFTarget(model)
