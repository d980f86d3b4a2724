"""Cost-scaled targets: a trained Qwen3 target plus dead layers, so that it costs like a named model.

REAL ACCEPTANCE, REAL COST, NOT A REAL MODEL. :func:`write_scaled_target` writes a plain Qwen3 checkpoint
folder: the base target's layers (the shipped character-level one by default) unchanged, then extra
decoder layers of the same shape with random (seeded) q/k/v/gate/up weights and zero output projections
(``o_proj`` and ``down_proj``). Each extra layer does its full work and adds exactly ``+0`` to the residual
stream, so every hidden state and logit is bit-identical to the base's and a drafter trained for the base
accepts exactly as much on it; :func:`layers_like` picks the layer count whose parameter count (and with it
the weight-matmul FLOPs per token) is a named model's (:data:`NAMED`).

Why extra layers of the base's shape and not a wider model (measured, ``tests/test_scaled_target.py``):
a Qwen3 config gives every layer one MLP width and head count, so a wider model widens the base's own
layers too, and their zero-padded reductions are then summed in another order by the BLAS. On this
project's CPU (MKL, AVX2, fp32) ``down_proj`` over 256 real units padded with zero columns gives other
bits for every padded width tried (257..4096 and 53504): MKL splits a 256-long reduction 128 + 128 but a
longer one in blocks of 192, and its one-row (decode) path needs yet another placement, so no placement of
the base's units is exact for every batch shape. Layers of the base's own shape run the base's kernels on
the base's shapes: exact by construction, on any BLAS. The price: a model this narrow needs thousands of
layers for a named model's parameters, so per-layer overheads and the KV cache (and attention FLOPs per
context token) are larger than the named model's; :func:`describe` prints both, and ``bench/RESULTS.md``
has a measured forward-time comparison.

The base's drafters run on the scaled target unchanged: base layer ``i`` is scaled layer ``i``, and a
drafter's ``num_target_layers`` only picks default layers when it names none (the shipped ones name theirs).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import torch

# The published configs (huggingface.co/Qwen/<name>/config.json) of the models a scaled target can cost like.
NAMED = {
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}
STORE_DTYPES = ("bfloat16", "float32")  # dtypes that hold a bf16 or fp32 base's weights exactly
INIT_STD = 0.02  # the extra weights' scale (Qwen3's initializer_range); their outputs are multiplied by 0
SHARD_BYTES = 1 << 30  # safetensors shard size (written one shard at a time: memory stays about one shard)


# ---- counting --------------------------------------------------------------------------------------


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _kv_heads(cfg: dict) -> int:
    return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]


def layer_matmul_params(cfg: dict) -> int:
    """Weights of one decoder layer's matmuls (q, k, v, o, gate, up, down), biases excluded."""
    H, d, I = cfg["hidden_size"], _head_dim(cfg), cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, _kv_heads(cfg) * d
    return H * q + 2 * H * kv + q * H + 3 * H * I


def layer_params(cfg: dict) -> int:
    """Parameters of one Qwen3 decoder layer: its matmuls and its four norms."""
    return layer_matmul_params(cfg) + 2 * cfg["hidden_size"] + 2 * _head_dim(cfg)


def param_count(cfg: dict) -> int:
    """Parameters of a Qwen3 causal LM with this config (no biases; a tied LM head counted once)."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    head = 0 if cfg.get("tie_word_embeddings") else V * H
    return V * H + head + cfg["num_hidden_layers"] * layer_params(cfg) + H


def matmul_flops_per_token(cfg: dict) -> int:
    """FLOPs of the weight matmuls for one token (2 per multiply-add): every layer's and the LM head's
    (tied or not); attention over the context comes on top (:func:`attention_flops_per_context_token`)."""
    return 2 * (cfg["num_hidden_layers"] * layer_matmul_params(cfg) + cfg["vocab_size"] * cfg["hidden_size"])


def attention_flops_per_context_token(cfg: dict) -> int:
    """FLOPs one new token spends per context token in attention (q.k and p.v, every head and layer)."""
    return 4 * cfg["num_hidden_layers"] * cfg["num_attention_heads"] * _head_dim(cfg)


def kv_values_per_token(cfg: dict) -> int:
    """KV-cache entries one token holds, over every layer (times the dtype's size = bytes)."""
    return 2 * cfg["num_hidden_layers"] * _kv_heads(cfg) * _head_dim(cfg)


def describe(cfg: dict) -> dict:
    """What a config costs per token: parameters, weight-matmul FLOPs, attention FLOPs per context token,
    KV-cache entries, layers."""
    return {"layers": cfg["num_hidden_layers"], "params": param_count(cfg),
            "matmul_flops_per_token": matmul_flops_per_token(cfg),
            "attention_flops_per_context_token": attention_flops_per_context_token(cfg),
            "kv_values_per_token": kv_values_per_token(cfg)}


# ---- the scaled config -----------------------------------------------------------------------------


def layers_like(base_cfg: dict, name: str) -> int:
    """The layer count at which the base plus extra layers of its shape has ``NAMED[name]``'s parameter
    count (and so its weight-matmul FLOPs per token: every weight is used once per token in both)."""
    outside = param_count(dict(base_cfg, num_hidden_layers=0))  # embedding, LM head, final norm
    return max(base_cfg["num_hidden_layers"], round((param_count(NAMED[name]) - outside) / layer_params(base_cfg)))


def scaled_config(base_cfg: dict, layers: int, dtype: str = "bfloat16", note: Optional[dict] = None) -> dict:
    """The base's config.json with ``layers`` decoder layers (and a ``ddtree_cost_scaled`` note that says
    what it is: transformers keeps unknown keys as attributes, vLLM ignores them)."""
    if layers < base_cfg["num_hidden_layers"]:
        raise ValueError(f"layers must be at least the base's {base_cfg['num_hidden_layers']}, got {layers}")
    cfg = dict(base_cfg, num_hidden_layers=layers, dtype=dtype)
    if "layer_types" in cfg:
        cfg["layer_types"] = ["full_attention"] * layers
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = layers
    cfg["ddtree_cost_scaled"] = {
        "what": "NOT A REAL MODEL: the base target's layers, then extra layers whose outputs are multiplied by "
                "zero; its logits and hidden states are the base's exactly, its forward costs like a larger model",
        "base_layers": base_cfg["num_hidden_layers"], **(note or {})}
    return cfg


def disk_bytes(base_cfg: dict, layers: int, dtype: str) -> int:
    """Size of the weights :func:`write_scaled_target` writes (tensor data, no headers)."""
    return param_count(dict(base_cfg, num_hidden_layers=layers)) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()


# ---- the weights -----------------------------------------------------------------------------------


def _extra_layer(i: int, base_cfg: dict, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Extra layer ``i``: random q/k/v/gate/up (work that is really done), unit norms, zero o_proj and
    down_proj (so the layer adds exactly +0 to the residual stream whatever the order of the sums)."""
    H, d, I = base_cfg["hidden_size"], _head_dim(base_cfg), base_cfg["intermediate_size"]
    q, kv = base_cfg["num_attention_heads"] * d, _kv_heads(base_cfg) * d
    p = f"model.layers.{i}."

    def rand(*size):
        return (torch.randn(size, generator=gen) * INIT_STD).to(dtype)

    return {
        p + "self_attn.q_proj.weight": rand(q, H),
        p + "self_attn.k_proj.weight": rand(kv, H),
        p + "self_attn.v_proj.weight": rand(kv, H),
        p + "self_attn.o_proj.weight": torch.zeros(H, q, dtype=dtype),
        p + "self_attn.q_norm.weight": torch.ones(d, dtype=dtype),
        p + "self_attn.k_norm.weight": torch.ones(d, dtype=dtype),
        p + "mlp.gate_proj.weight": rand(I, H),
        p + "mlp.up_proj.weight": rand(I, H),
        p + "mlp.down_proj.weight": torch.zeros(H, I, dtype=dtype),
        p + "input_layernorm.weight": torch.ones(H, dtype=dtype),
        p + "post_attention_layernorm.weight": torch.ones(H, dtype=dtype),
    }


def _exact(name: str, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` in ``dtype``, refusing a cast that changes a value (the base must be copied exactly)."""
    out = v.to(dtype)
    if not torch.equal(out.to(v.dtype), v):
        raise ValueError(f"base weight {name} ({v.dtype}) does not fit {dtype} exactly; store as float32")
    return out


def _load_base(base_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {base_dir}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def write_scaled_target(base_dir, out_dir, layers: int, dtype: str = "bfloat16", seed: int = 0,
                        like: Optional[str] = None) -> dict:
    """Write the cost-scaled target of ``base_dir`` (a Qwen3 checkpoint folder) with ``layers`` decoder
    layers to ``out_dir`` (created if needed): ``config.json``, the base's other files (tokenizer,
    generation settings) and safetensors shards of about :data:`SHARD_BYTES` (with an index when more than
    one). The extra weights are ``N(0, INIT_STD)`` draws from a generator seeded with ``seed``; everything
    is stored in ``dtype``. Returns the config written."""
    from safetensors.torch import save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    base_cfg = json.loads((base_dir / "config.json").read_text())
    if base_cfg.get("model_type") != "qwen3":
        raise ValueError(f"the base must be a Qwen3 checkpoint, got model_type {base_cfg.get('model_type')!r}")
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    cfg = scaled_config(base_cfg, layers, dtype, note={"like": like, "seed": seed})
    tdtype = getattr(torch, dtype)
    base = {k: _exact(k, v, tdtype) for k, v in _load_base(base_dir).items()}
    gen = torch.Generator().manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Whole layers per shard, in order; the first shard also holds the base's own tensors (its layers,
    # embedding, final norm, LM head). Each shard is built, written and dropped before the next.
    layer_bytes = layer_params(base_cfg) * tdtype.itemsize
    per_shard = max(1, SHARD_BYTES // layer_bytes)
    L0 = base_cfg["num_hidden_layers"]
    count = max(1, math.ceil((layers - L0) / per_shard))
    weight_map, total = {}, 0
    for j in range(count):
        name = f"model-{j + 1:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors"
        shard = dict(base) if j == 0 else {}
        for i in range(L0 + j * per_shard, min(L0 + (j + 1) * per_shard, layers)):
            shard.update(_extra_layer(i, base_cfg, gen, tdtype))
        save_file({k: v.contiguous() for k, v in shard.items()}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(v.numel() * v.element_size() for v in shard.values())
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in base_dir.iterdir():  # the tokenizer and generation settings, as they are
        if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".index.json")):
            shutil.copy2(f, out_dir / f.name)
    return cfg
