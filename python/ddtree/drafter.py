"""The DFlash block-diffusion drafter.

Qwen3-style decoder layers whose keys and values see, besides the block being drafted, the projected
hidden states of chosen target layers (the "context features"). The drafter has no embedding and no
LM head of its own: the block ``[x, MASK * (block_size - 1)]`` is embedded with the target's embedding
and its outputs at block positions ``1..block_size-1`` go through the drafter's final norm and the
target's LM head, giving logits for depths ``1..D`` (``D = block_size - 1``) in one forward.

Per layer the context part of the keys/values, ``k_norm(k_proj(c))`` and ``v_proj(c)`` with
``c = hidden_norm(fc(features))``, depends only on the features, so it is computed once per token and
kept in a static cache; the block part is recomputed every round and overwritten next round (the cache
"grows by the accepted tokens only"). Attention within the block is bidirectional; it runs through
:func:`ddtree.tree_attention` with an all-ones mask, which also handles ragged context lengths.

Checkpoint layout (the published one): ``config.json`` (Qwen3-like, plus ``block_size``,
``num_target_layers`` and ``dflash_config = {target_layer_ids, mask_token_id}``) and safetensors weights
``fc.weight [H, len(target_layer_ids)*H]``, ``hidden_norm.weight``, ``norm.weight`` and per layer
``layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``layers.{i}.self_attn.{q,k}_norm.weight``,
``layers.{i}.mlp.{gate,up,down}_proj.weight``, ``layers.{i}.{input,post_attention}_layernorm.weight``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .layers import RMSNorm, rope, write_kv
from .ops import pack_mask, tree_attention


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The reference's choice when a checkpoint names no layers: spread over ``1..num_target_layers-3``."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [int(round(start + i * (end - start) / (num_draft_layers - 1))) for i in range(num_draft_layers)]


@dataclass
class DFlashConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    block_size: int
    num_target_layers: int
    target_layer_ids: list[int]
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_bias: bool = False
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    @classmethod
    def from_dict(cls, d: dict) -> "DFlashConfig":
        d = dict(d)
        dflash = d.pop("dflash_config", {}) or {}
        rope = d.get("rope_parameters") or {}
        rope_types = {(d.get("rope_scaling") or {}).get("rope_type"), rope.get("rope_type")}
        if rope_types - {"default", None}:
            raise ValueError("DFlash drafter: only default RoPE is supported (config.json has rope_scaling)")
        H, nh = d["hidden_size"], d["num_attention_heads"]
        layers = d["num_hidden_layers"]
        ids = dflash.get("target_layer_ids") or default_target_layer_ids(d["num_target_layers"], layers)
        if dflash.get("mask_token_id") is None:
            raise ValueError("DFlash drafter: config.json has no dflash_config.mask_token_id")
        known = dict(
            hidden_size=H,
            num_hidden_layers=layers,
            num_attention_heads=nh,
            num_key_value_heads=d.get("num_key_value_heads", nh),
            head_dim=d.get("head_dim") or H // nh,
            intermediate_size=d["intermediate_size"],
            vocab_size=d["vocab_size"],
            block_size=d["block_size"],
            num_target_layers=d["num_target_layers"],
            target_layer_ids=list(ids),
            mask_token_id=int(dflash["mask_token_id"]),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=d.get("rope_theta", rope.get("rope_theta", 1_000_000.0)),
            attention_bias=d.get("attention_bias", False),
        )
        skip = set(known) | {"dflash_config", "rope_parameters"}
        return cls(**known, extra={k: v for k, v in d.items() if k not in skip})

    @classmethod
    def for_target(cls, target_cfg, num_layers: int, block_size: int, mask_token_id: int,
                   target_layer_ids: Optional[list[int]] = None) -> "DFlashConfig":
        """A drafter shaped for a target's Hugging Face config: the same hidden size, head layout, MLP
        width, vocabulary and norm epsilon. ``target_layer_ids`` default to :func:`default_target_layer_ids`."""
        L = target_cfg.num_hidden_layers
        ids = target_layer_ids if target_layer_ids is not None else default_target_layer_ids(L, num_layers)
        return cls(
            hidden_size=target_cfg.hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=target_cfg.num_attention_heads, num_key_value_heads=target_cfg.num_key_value_heads,
            head_dim=target_cfg.head_dim, intermediate_size=target_cfg.intermediate_size,
            vocab_size=target_cfg.vocab_size, block_size=block_size, num_target_layers=L,
            target_layer_ids=list(ids), mask_token_id=mask_token_id, rms_norm_eps=target_cfg.rms_norm_eps,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        ids, mask = d.pop("target_layer_ids"), d.pop("mask_token_id")
        out = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_act": "silu", **extra, **d}
        out["dflash_config"] = {"target_layer_ids": ids, "mask_token_id": mask}
        return out


class DrafterAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        H, d, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.cfg, self.head_dim = cfg, d
        self.q_proj = nn.Linear(H, cfg.num_attention_heads * d, bias=bias)
        self.k_proj = nn.Linear(H, cfg.num_key_value_heads * d, bias=bias)
        self.v_proj = nn.Linear(H, cfg.num_key_value_heads * d, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, H, bias=bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def kv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, T, H]`` -> keys (normed, RoPE'd) and values ``[B, Hkv, T, d]``."""
        B, T, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        return rope(k, positions, self.cfg.rope_theta), v

    def forward(self, x, positions, k_cache, v_cache, context_lens, block_mask, last_slot) -> torch.Tensor:
        """The block's attention: x ``[B, T, H]`` at positions ``[B, T]``; its K/V go to ``context_lens + j``."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)
        q = rope(q, positions, self.cfg.rope_theta)
        k, v = self.kv(x, positions)
        write_kv(k_cache, positions, k)
        write_kv(v_cache, positions, v)
        out = tree_attention(q, k_cache, v_cache, context_lens, block_mask, last_slot, self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DrafterMLP(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.self_attn = DrafterAttention(cfg)
        self.mlp = DrafterMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, *attn_args):
        x = x + self.self_attn(self.input_layernorm(x), *attn_args)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    """The drafter with its context cache. Shapes: ``B`` requests, ``P`` new context tokens,
    ``F = len(target_layer_ids) * H``, ``D = block_size - 1``, ``S`` cache capacity."""

    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DrafterLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.context_lens: Optional[torch.Tensor] = None  # [B] i64
        self._block_mask: Optional[torch.Tensor] = None  # [B, bs, ceil(bs/32)] i32, all bits set
        self._last_slot: Optional[torch.Tensor] = None  # [B] i32 = bs - 1

    # the attributes the decode loop reads
    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    @property
    def target_layer_ids(self) -> list[int]:
        return self.cfg.target_layer_ids

    @property
    def mask_token_id(self) -> int:
        return self.cfg.mask_token_id

    def reset(self, batch_size: int, max_len: int) -> None:
        """Empty the context cache: ``[B, Hkv, max_len, d]`` per layer; ``max_len`` must cover the longest
        context plus one block."""
        p = self.fc.weight
        shape = (batch_size, self.cfg.num_key_value_heads, max_len, self.cfg.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.context_lens = torch.zeros(batch_size, dtype=torch.long, device=p.device)
        # Every block slot sees the whole context and the whole block: a tree mask with all bits set.
        bs = self.block_size
        self._block_mask = pack_mask(torch.ones(batch_size, bs, bs, dtype=torch.bool, device=p.device))
        self._last_slot = torch.full((batch_size,), self.block_size - 1, dtype=torch.int32, device=p.device)

    @torch.inference_mode()
    def extend(self, features: torch.Tensor, lengths: torch.Tensor) -> None:
        """Append context: features ``[B, P, F]`` of the next ``lengths[b] <= P`` committed tokens (i64 ``[B]``).

        Entries past ``lengths[b]`` are written too (they land past the new context end, where the next
        block overwrites them), so this needs no host synchronisation.
        """
        B, P, _ = features.shape
        if P == 0:
            return
        S = self.k_cache[0].shape[2]
        positions = (self.context_lens[:, None] + torch.arange(P, device=features.device)).clamp(max=S - 1)
        c = self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            k, v = layer.self_attn.kv(c, positions)
            write_kv(kc, positions, k)
            write_kv(vc, positions, v)
        self.context_lens = self.context_lens + lengths.to(torch.long)

    @torch.inference_mode()
    def draft(self, target, root_tokens: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One drafting round: append the new context features, then one forward over the block.

        target: the runner whose ``embed``/``lm_head`` the drafter shares. root_tokens ``[B]`` i64 (the last
        committed token ``x``, at position ``context_len``); features ``[B, P, F]`` and lengths ``[B]`` as in
        :meth:`extend`. Returns logits ``[B, D, V]`` f32 for depths ``1..D``.
        """
        self.extend(features, lengths)
        B, bs = root_tokens.shape[0], self.block_size
        dev = root_tokens.device
        block = torch.cat([root_tokens[:, None], torch.full((B, bs - 1), self.mask_token_id, device=dev)], dim=1)
        positions = self.context_lens[:, None] + torch.arange(bs, device=dev)
        x = target.embed(block).to(self.fc.weight.dtype)
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            x = layer(x, positions, kc, vc, self.context_lens, self._block_mask, self._last_slot)
        return target.lm_head(self.norm(x[:, 1:]).to(target.dtype))

    # ---- checkpoints -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32) -> "DFlashDrafter":
        """Load ``config.json`` and ``*.safetensors`` from a local folder (a ``model.`` key prefix is accepted)."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg = DFlashConfig.from_dict(json.loads((path / "config.json").read_text()))
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {path}")
        state = {}
        for f in files:
            state.update({k.removeprefix("model."): v for k, v in load_file(str(f)).items()})
        # The drafter uses the target's embedding and LM head; a checkpoint that carries copies of them
        # loads all the same (they are not used).
        state = {k: v for k, v in state.items() if not k.startswith(("embed_tokens.", "lm_head."))}
        model = cls(cfg)
        model.load_state_dict(state, strict=True)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the published layout: ``config.json`` and ``model.safetensors``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))

