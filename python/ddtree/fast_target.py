"""Fast target runner for Llama- and Qwen3-family checkpoints (gpt-fast style, one short module).

The model is read straight from a checkpoint folder (``config.json`` + ``*.safetensors``); the Hugging
Face model is never instantiated. What makes it fast:

* a static KV cache per layer in the layout of ``tree_attention`` (``[B, Hkv, S, d]``), written on the
  device at ``context_lens + slot`` (no host synchronisation);
* attention through ``torch.ops.ddtree.tree_attention`` (context + own ancestors, no dense mask);
* fused projections (``wqkv``, ``w13``) so a layer is a handful of kernels;
* on CUDA, the verify forward captured in CUDA graphs, one per bucketed tree size (1, 16, ..., 1024
  slots): a tree with fewer slots is copied into the bucket's static input buffers and padded (token 0,
  zero mask rows and words, ``num_nodes`` unchanged), so a round runs no Python per layer.

It implements the target runner interface of :mod:`ddtree.target` (duck-typed): ``config``, ``device``,
``dtype``, ``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``feature_layer_ids``,
``context_lens``, ``max_len``, ``set_feature_layers``, ``embed``, ``lm_head``, ``reset``, ``prefill``,
``verify``, ``commit``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import ops
from .layers import apply_rope, inv_freq, rms_norm, rope_cos_sin, write_kv
from .ops import DraftTree

SUPPORTED_MODEL_TYPES = ("llama", "qwen3")
# Tree sizes in slots (nodes + 1, the root included) with a captured verify graph on CUDA: the budgets
# 0, 16, 32, ..., 1024 nodes each fit their own bucket exactly (a 64-node tree is not padded to 128).
DEFAULT_BUCKETS = (1, 17, 33, 65, 129, 257, 513, 1025)


# --------------------------------------------------------------------------------------------------
# Config


def _cfg(config, name, default=None):
    """Read a field from a PretrainedConfig or a plain dict."""
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def rope_parameters(config) -> dict:
    """The RoPE settings of a config in one dict with ``rope_type`` and ``rope_theta``.

    Handles both the transformers >= 5 layout (``rope_parameters``) and the older one (top-level
    ``rope_theta`` plus an optional ``rope_scaling``).
    """
    rope = dict(_cfg(config, "rope_parameters") or _cfg(config, "rope_scaling") or {})
    rope.setdefault("rope_theta", _cfg(config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default")) or "default"
    return rope


def unsupported_reason(config) -> Optional[str]:
    """Why this runner cannot run ``config`` (``None`` when it can)."""
    mt = _cfg(config, "model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        return f"model_type {mt!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if _cfg(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {_cfg(config, 'hidden_act')!r} is not silu"
    rt = rope_parameters(config)["rope_type"]
    if rt not in ("default", "llama3"):
        return f"rope_type {rt!r} is not supported (default and llama3 are)"
    if _cfg(config, "use_sliding_window", False):
        return "sliding-window attention is not supported"
    if float(rope_parameters(config).get("partial_rotary_factor", 1.0)) != 1.0:
        return "partial rotary embeddings are not supported"
    return None


def rope_inv_freq(config, head_dim: int) -> torch.Tensor:
    """``[head_dim / 2]`` f32 inverse frequencies, exactly as transformers computes them."""
    rope = rope_parameters(config)
    default = inv_freq(float(rope["rope_theta"]), head_dim)
    if rope["rope_type"] == "default":
        return default
    if rope["rope_type"] == "llama3":
        factor, lo, hi = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_ctx = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / default
        scaled = torch.where(wavelen > low_wavelen, default / factor, default)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"fast target: unsupported rope_type {rope['rope_type']!r} (default and llama3 are supported)")


@dataclass
class Shape:
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    qk_norm: bool  # Qwen3: RMSNorm over the head dim of q and k before RoPE

    @staticmethod
    def of(config) -> "Shape":
        heads = _cfg(config, "num_attention_heads")
        hidden = _cfg(config, "hidden_size")
        return Shape(
            vocab=_cfg(config, "vocab_size"),
            hidden=hidden,
            inter=_cfg(config, "intermediate_size"),
            layers=_cfg(config, "num_hidden_layers"),
            heads=heads,
            kv_heads=_cfg(config, "num_key_value_heads") or heads,
            head_dim=_cfg(config, "head_dim") or hidden // heads,
            eps=float(_cfg(config, "rms_norm_eps", 1e-6)),
            qk_norm=_cfg(config, "model_type") == "qwen3",
        )


# --------------------------------------------------------------------------------------------------
# Weights


def _load_safetensors(path: str, device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"fast target: no *.safetensors in {path}")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f), device=str(device)))
    return state


def _load_config(path: str):
    """The checkpoint's PretrainedConfig (through transformers' AutoConfig: no model is built)."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path)
    except ImportError:  # transformers is optional for this runner: fall back to the raw dict
        with open(os.path.join(path, "config.json")) as fh:
            return json.load(fh)


# --------------------------------------------------------------------------------------------------
# Runner


class FastTarget:
    """Static-cache Llama/Qwen3 target with tree attention and CUDA-graph verify (see module doc).

    Build with :meth:`from_pretrained` (a checkpoint folder) or :meth:`from_model` (a loaded Hugging
    Face model). ``use_graphs`` (default: on CUDA) captures the verify forward per bucket on first use;
    ``buckets`` (default :data:`DEFAULT_BUCKETS`) are the padded tree sizes. On CPU ``buckets`` may be set
    to exercise the padding path without graphs.
    """

    def __init__(self, config, state: dict[str, torch.Tensor], device, dtype,
                 use_graphs: Optional[bool] = None, buckets: Optional[Sequence[int]] = None):
        reason = unsupported_reason(config)
        if reason is not None:
            raise ValueError(f"fast target: {reason}")
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        s = self.shape = Shape.of(config)
        self.vocab_size, self.hidden_size, self.num_hidden_layers = s.vocab, s.hidden, s.layers
        self.scale = s.head_dim ** -0.5

        def w(name):
            return state[name].to(device=self.device, dtype=dtype)

        def opt(name):
            return w(name) if name in state else None

        self.embed_weight = w("model.embed_tokens.weight")
        tied = _cfg(config, "tie_word_embeddings", False) or "lm_head.weight" not in state
        self.lm_head_weight = self.embed_weight if tied else w("lm_head.weight")
        self.norm_weight = w("model.norm.weight")
        self.layers = []
        for i in range(s.layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            qkv_b = [opt(a + n + "_proj.bias") for n in "qkv"]
            self.layers.append({
                "attn_norm": w(p + "input_layernorm.weight"),
                "mlp_norm": w(p + "post_attention_layernorm.weight"),
                "wqkv": torch.cat([w(a + n + "_proj.weight") for n in "qkv"]),
                "bqkv": torch.cat(qkv_b) if qkv_b[0] is not None else None,
                "wo": w(a + "o_proj.weight"),
                "bo": opt(a + "o_proj.bias"),
                "q_norm": opt(a + "q_norm.weight") if s.qk_norm else None,
                "k_norm": opt(a + "k_norm.weight") if s.qk_norm else None,
                "w13": torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]),
                "b13": (torch.cat([w(p + "mlp.gate_proj.bias"), w(p + "mlp.up_proj.bias")])
                        if p + "mlp.gate_proj.bias" in state else None),
                "w2": w(p + "mlp.down_proj.weight"),
                "b2": opt(p + "mlp.down_proj.bias"),
            })
        self.inv_freq = rope_inv_freq(config, s.head_dim).to(self.device)
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("fast target: CUDA graphs need a CUDA device")
        self.buckets = tuple(sorted(buckets)) if buckets is not None else (DEFAULT_BUCKETS if self.use_graphs else ())
        self.feature_layer_ids: list[int] = []
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.context_lens = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.max_len = 0
        self._graphs: dict[int, "_VerifyGraph"] = {}
        self._pool = None

    # ---- construction ----------------------------------------------------------------------------

    @staticmethod
    def supports(config) -> bool:
        """Whether this runner can run a checkpoint with this config (PretrainedConfig or dict)."""
        return unsupported_reason(config) is None

    @classmethod
    def from_pretrained(cls, path: str, device="cuda", dtype=torch.bfloat16, **kw) -> "FastTarget":
        """Load ``config.json`` and the safetensors weights of a Llama/Qwen3 checkpoint folder."""
        config = _load_config(path)
        reason = unsupported_reason(config)
        if reason is not None:
            raise ValueError(f"fast target: {path}: {reason}")
        return cls(config, _load_safetensors(path, device), device, dtype, **kw)

    @classmethod
    def from_model(cls, model, **kw) -> "FastTarget":
        """From a loaded Hugging Face Llama/Qwen3 causal LM, on its device and in its dtype. The fused
        projections are copies: the HF model may be freed afterwards."""
        p = next(model.parameters())
        return cls(model.config, dict(model.state_dict()), p.device, p.dtype, **kw)

    # ---- interface: small pieces ----------------------------------------------------------------

    def set_feature_layers(self, layer_ids: list[int]) -> None:
        """Layers whose outputs prefill/verify return, concatenated in this order (F = len * H)."""
        bad = [i for i in layer_ids if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"fast target: feature layer ids {bad} out of range [0, {self.num_hidden_layers})")
        if list(layer_ids) != self.feature_layer_ids:
            self.feature_layer_ids = list(layer_ids)
            self._drop_graphs()  # captured graphs return the old feature set

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids ``[...]`` i64 -> ``[..., H]`` in the model dtype."""
        return F.embedding(ids, self.embed_weight)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[..., H]`` (already normed) -> logits ``[..., V]`` f32. LM head only."""
        return F.linear(hidden.to(self.dtype), self.lm_head_weight).float()

    @torch.inference_mode()
    def reset(self, batch_size: int, max_len: int) -> None:
        """Allocate the static caches ``[B, Hkv, S, d]`` per layer and set ``context_lens = 0``. Buffers for
        the same batch size that are already long enough are kept, and with them the captured graphs.

        ``S = max_len + largest bucket``: padding slots of a bucketed tree are written past the real
        ones, and the headroom keeps them inside the cache whenever ``ctx + real slots <= max_len``.
        """
        s = self.shape
        S = max_len + (max(self.buckets) if self.buckets else 0)
        self.max_len = max_len
        if self.k_cache and self.k_cache[0].shape[0] == batch_size and self.k_cache[0].shape[2] >= S:
            # Keep the buffers (stale entries lie past context_lens and are never read), so the captured
            # graphs, which hold their addresses, stay valid across generate() calls of any length.
            self.context_lens.zero_()
            return
        shape = (batch_size, s.kv_heads, S, s.head_dim)
        self._drop_graphs()  # before allocating: their pool may hold memory the new caches can use
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(s.layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(s.layers)]
        self.context_lens = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        # RoPE table over every cache position: a gather in the forward (capturable), values identical
        # to transformers' cos(pos * inv_freq) computed in fp32 then cast.
        all_positions = torch.arange(S, device=self.device, dtype=torch.int64)
        self.cos_table, self.sin_table = rope_cos_sin(all_positions, self.inv_freq, self.dtype)

    def _drop_graphs(self) -> None:
        """Forget every captured graph and their memory pool (a later capture starts a fresh pool)."""
        self._graphs.clear()
        self._pool = None

    # ---- the forward -----------------------------------------------------------------------------

    def _layer_qkv(self, L: dict, h: torch.Tensor, positions: torch.Tensor):
        """h ``[B, T, H]`` -> q ``[B, Hq, T, d]``, k, v ``[B, Hkv, T, d]`` after norms and RoPE."""
        s = self.shape
        B, T, _ = h.shape
        x = rms_norm(h, L["attn_norm"], s.eps)
        qkv = F.linear(x, L["wqkv"], L["bqkv"])
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        q = q.view(B, T, s.heads, s.head_dim)
        k = k.view(B, T, s.kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = rms_norm(q, L["q_norm"], s.eps), rms_norm(k, L["k_norm"], s.eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = self.cos_table[positions], self.sin_table[positions]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _layer_rest(self, L: dict, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """attn ``[B, Hq, T, d]`` -> the layer's output ``[B, T, H]`` (o-proj, residual, MLP)."""
        B, T, _ = h.shape
        h = h + F.linear(attn.transpose(1, 2).reshape(B, T, -1), L["wo"], L["bo"])
        gate, up = F.linear(rms_norm(h, L["mlp_norm"], self.shape.eps), L["w13"], L["b13"]).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, L["w2"], L["b2"])

    def _decoder(self, tokens, positions, write_pos, attend):
        """Every decoder layer over tokens, positions ``[B, T]`` i64: each layer writes its K/V at
        ``write_pos [B, T]`` and attends through ``attend(layer index, q, k, v)``. Returns the last
        layer's output ``[B, T, H]`` (before the final norm) and the features ``[B, T, F]``."""
        h = self.embed(tokens)
        feats = {}
        for i, L in enumerate(self.layers):
            q, k, v = self._layer_qkv(L, h, positions)
            write_kv(self.k_cache[i], write_pos, k)
            write_kv(self.v_cache[i], write_pos, v)
            h = self._layer_rest(L, h, attend(i, q, k, v))
            if i in self.feature_layer_ids:
                feats[i] = h
        if not self.feature_layer_ids:
            return h, h.new_empty((*h.shape[:-1], 0))
        return h, torch.cat([feats[i] for i in self.feature_layer_ids], dim=-1)

    def _forward_tree(self, tokens, positions, tree_mask, num_nodes):
        """The verify forward. tokens, positions ``[B, T]`` i64; tree_mask ``[B, T, ceil(T/32)]`` i32;
        num_nodes ``[B]`` i32. Writes slot t's K/V at ``context_lens + t``; returns logits ``[B, T, V]``
        f32 and features ``[B, T, F]``. Device-only work: safe to capture in a CUDA graph."""
        write_pos = self.context_lens[:, None] + torch.arange(tokens.shape[1], device=self.device)

        def attend(i, q, k, v):  # the context and each slot's own ancestors, from the cache
            return torch.ops.ddtree.tree_attention(q, self.k_cache[i], self.v_cache[i], self.context_lens,
                                                   tree_mask, num_nodes, self.scale)

        h, feats = self._decoder(tokens, positions, write_pos, attend)
        return self.lm_head(rms_norm(h, self.norm_weight, self.shape.eps)), feats

    # ---- interface: prefill / verify / commit ----------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor):
        """Right-padded prompts ``[B, L]`` i64 with ``lengths [B]`` -> (logits ``[B, V]`` f32 at each last
        prompt token, features ``[B, L, F]``). Writes K/V at 0..L-1 (padding positions hold junk past
        ``context_lens`` and are overwritten later) and sets ``context_lens = lengths``.

        Causal attention over the prompt itself (SDPA); the cache must be fresh (after :meth:`reset`).
        """
        B, L = input_ids.shape
        if B != self.context_lens.shape[0]:
            raise ValueError(f"fast target: prefill batch {B} != reset batch {self.context_lens.shape[0]}")
        if L > self.max_len:
            raise ValueError(f"fast target: prompt length {L} > max_len {self.max_len}")
        s = self.shape
        positions = torch.arange(L, device=self.device).expand(B, L)

        def attend(i, q, k, v):  # causal over the prompt itself: the context is empty
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                  enable_gqa=s.heads != s.kv_heads)

        h, feats = self._decoder(input_ids.to(self.device), positions, positions, attend)
        lengths = lengths.to(device=self.device, dtype=torch.int64)
        last = h[torch.arange(B, device=self.device), lengths - 1]  # [B, H]
        logits = self.lm_head(rms_norm(last, self.norm_weight, s.eps))
        self.context_lens.copy_(lengths)  # in place: captured graphs read this tensor
        return logits, feats

    def bucket(self, slots: int) -> int:
        """The smallest bucket holding ``slots`` (``slots`` itself when there is none)."""
        for b in self.buckets:
            if b >= slots:
                return b
        return slots

    @torch.inference_mode()
    def verify(self, tree: DraftTree):
        """One forward over the ``T = tree.num_slots`` slots of ``tree`` -> (logits ``[B, T, V]`` f32,
        features ``[B, T, F]``). Writes the slots' K/V at ``context_lens + slot``; ``context_lens``
        unchanged. Trees are padded to the bucket size (graph replay on CUDA), outputs sliced back.
        Caller guarantees ``context_lens + T <= max_len``.
        """
        T = tree.num_slots
        Tb = self.bucket(T)
        if self.use_graphs and Tb in self.buckets:
            graph = self._graphs.get(Tb)
            if graph is None:
                graph = self._graphs[Tb] = _VerifyGraph(self, Tb)
            return graph.run(tree)
        # Eager: on CPU (padded like the graphs, so both paths compute the same thing), or a tree larger
        # than the largest bucket (not captured: each such size would hold its own [B, T, V] logits).
        if Tb == T:
            return self._forward_tree(tree.tokens, tree.positions, tree.tree_mask, tree.num_nodes)
        buf = _PaddedInputs(self, Tb)
        buf.load(tree)
        logits, feats = self._forward_tree(buf.tokens, buf.positions, buf.tree_mask, buf.num_nodes)
        return logits[:, :T], feats[:, :T]

    @torch.inference_mode()
    def commit(self, accepted_slots: torch.Tensor, accept_len: torch.Tensor) -> None:
        """Move the accepted slots' K/V to ``ctx..ctx+a-1`` in every layer (one ``compact_kv``), then
        ``context_lens += accept_len``. accepted_slots ``[B, D+1]`` i64, accept_len ``[B]`` i32."""
        ops.compact_kv(self.k_cache + self.v_cache, self.context_lens, accepted_slots, accept_len)
        self.context_lens += accept_len.to(torch.int64)  # in place: captured graphs read this tensor


# --------------------------------------------------------------------------------------------------
# Bucket padding and CUDA graphs


class _PaddedInputs:
    """Static input buffers of one bucket: ``Tb`` slots, ``ceil(Tb/32)`` mask words.

    Padding slots get token 0, the last real position (any in-range value would do: the slot's key is
    never attended since its index exceeds ``num_nodes``), a zero mask row, and the real rows' extra
    mask words are zero; ``num_nodes`` is copied unchanged.
    """

    def __init__(self, runner: FastTarget, Tb: int):
        B, dev = runner.context_lens.shape[0], runner.device
        self.Tb = Tb
        self.tokens = torch.zeros(B, Tb, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(B, Tb, dtype=torch.int64, device=dev)
        self.tree_mask = torch.zeros(B, Tb, (Tb + 31) // 32, dtype=torch.int32, device=dev)
        self.num_nodes = torch.zeros(B, dtype=torch.int32, device=dev)

    def load(self, tree: DraftTree) -> None:
        """Copy ``tree`` (``T <= Tb`` slots) into the buffers, padding the rest. Device copies only."""
        T, W = tree.num_slots, tree.tree_mask.shape[2]
        if T > self.Tb:
            raise ValueError(f"fast target: tree of {T} slots does not fit bucket {self.Tb}")
        self.tokens[:, :T].copy_(tree.tokens)
        self.tokens[:, T:].zero_()
        self.positions[:, :T].copy_(tree.positions)
        self.positions[:, T:].copy_(tree.positions[:, :1].expand(-1, self.Tb - T))
        self.tree_mask.zero_()
        self.tree_mask[:, :T, :W].copy_(tree.tree_mask)
        self.num_nodes.copy_(tree.num_nodes)


class _VerifyGraph:
    """The verify forward of one bucket captured in a CUDA graph (static inputs, static outputs).

    Capture is lazy (first tree of that size). It reads the runner's caches and ``context_lens`` by
    address, so a :meth:`FastTarget.reset` to a new shape and a new feature set drop all graphs.
    Graphs of all buckets share one memory pool (they never run concurrently).
    """

    def __init__(self, runner: FastTarget, Tb: int, warmup: int = 2):
        self.runner, self.inputs = runner, _PaddedInputs(runner, Tb)
        a = self.inputs
        # Warm up on a side stream (allocator and library handles), as torch.cuda.graphs recommends.
        # The warm-up writes junk K/V past context_lens only, which the next verify overwrites.
        stream = torch.cuda.Stream(device=runner.device)
        stream.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                runner._forward_tree(a.tokens, a.positions, a.tree_mask, a.num_nodes)
        torch.cuda.current_stream(runner.device).wait_stream(stream)
        if runner._pool is None:
            runner._pool = torch.cuda.graph_pool_handle()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner._pool):
            self.logits, self.features = runner._forward_tree(a.tokens, a.positions, a.tree_mask, a.num_nodes)

    def run(self, tree: DraftTree):
        T = tree.num_slots
        self.inputs.load(tree)
        self.graph.replay()
        # Views of the static outputs: valid until the next replay of any bucket (the buckets share a
        # memory pool, so one graph's scratch may overlay another's outputs). Callers that keep them
        # across rounds must clone (the decode loop gathers the accepted features: a copy).
        return self.logits[:, :T], self.features[:, :T]

