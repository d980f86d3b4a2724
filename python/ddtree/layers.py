"""The decoder-layer math shared by the drafter, the fast target runner and the Hugging Face runner.

Each function follows transformers' Llama/Qwen3 modules operation for operation, so fp32 results agree
with a stock model to rounding: RMSNorm normalises in fp32, casts back, then scales; RoPE is the
rotate-half form with ``cos``/``sin`` computed in fp32 and cast to the activations' dtype.
"""
from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, cast back to x's dtype, then scaled (transformers' order)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    """:func:`rms_norm` with its weight as a parameter (the drafter's checkpoint layout)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def inv_freq(theta: float, head_dim: int, device=None) -> torch.Tensor:
    """``[head_dim / 2]`` f32 inverse frequencies of default RoPE, as transformers computes them."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions ``[...]`` i64 -> (cos, sin) ``[..., d]`` in ``dtype`` (angles in fp32)."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, H, T, d]``; cos, sin ``[B, T, d]`` in x's dtype (rotate-half form)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Default RoPE of x ``[B, H, T, d]`` at positions ``[B, T]`` i64, angles computed on the fly."""
    return apply_rope(x, *rope_cos_sin(positions, inv_freq(theta, x.shape[-1], x.device), x.dtype))


def write_kv(cache: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """In place, on the device: ``cache[b, :, positions[b, t]] = values[b, :, t]``.

    cache ``[B, H, S, d]``, positions ``[B, T]`` i64 (distinct within a row, ``< S``), values ``[B, H, T, d]``.
    """
    rows = torch.arange(cache.shape[0], device=cache.device)[:, None]
    # Mixed advanced indexing puts the indexed dims first: the target view is [B, T, H, d].
    cache[rows, :, positions] = values.transpose(1, 2).to(cache.dtype)
