"""Cost-scaled targets: a trained Qwen3 target plus dead weight, so that it costs like a named model.

REAL ACCEPTANCE, REAL COST, NOT A REAL MODEL. :func:`write_scaled_target` writes a plain Qwen3 checkpoint
folder whose every hidden state and logit is bit-identical to the base target's (the shipped
character-level one by default) on the CPU it was written on, so a drafter trained for the base accepts
exactly as much on it, while its forward does a larger model's work. Two shapes:

* :func:`shape_like` (``ddtree scale-target --like NAME``): the named model's layer count, its attention
  widths (``heads * head_dim``) in the base's head size, so the KV cache per token and the attention FLOPs
  per context token are the named model's, and the MLP width that brings the parameter count (and the
  weight-matmul FLOPs per token) to the named model's. The base's layers are widened: its query and KV
  heads are the first ones (the group size stays the base's), its MLP units placed by :func:`mlp_layout`; the
  extra heads and units get random (seeded) q/k/v/gate/up weights and zero ``o_proj``/``down_proj``
  columns. Layers after the base's are extra layers: random q/k/v/gate/up, unit norms, zero ``o_proj`` and
  ``down_proj``, so each adds exactly ``+0`` to the residual stream.
* :func:`layers_only` (``--layers N``): the base's own shape and extra layers only. Exact by construction
  on any BLAS (the base's layers run the base's kernels on the base's shapes), but a model this narrow
  needs thousands of layers for a named model's size, and per-layer overheads then dominate.

Why widening needs care (``bench/probe_padded_matmul.py``): the base's ``down_proj`` then sums its 256
real units inside a longer reduction whose extra terms are ``0 * x``; adding ``+0`` changes nothing, but
the BLAS may group the terms differently. MKL (AVX2, fp32) sums a 256-long reduction as 128 + 128 and a
longer one in blocks of 192, and its one-row path sums from the start: the base's units first, contiguous,
are exact for 1-3 rows only. Placing the second 128 units at the start of the next block (a gap of 64 zero
columns) reproduces both orders. :func:`mlp_layout` finds such a placement by trying it on this CPU's
BLAS over :data:`PROBE_ROWS` (1 to 2049 rows: decoding, trees, batches, prefills; a longer forward is not
checked), and refuses to write a widened target where it finds none; the tests then check logits and
features with ``torch.equal`` through transformers and both runners.

The base's drafters run on the scaled target unchanged: base layer ``i`` is scaled layer ``i``, and a
drafter's ``num_target_layers`` only picks default layers when it names none (the shipped ones name theirs).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
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


# ---- the scaled shape ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaledShape:
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int


def layers_only(base_cfg: dict, layers: int) -> ScaledShape:
    """The base's own layer shape, ``layers`` of them (extra layers only: exact on any BLAS)."""
    return ScaledShape(layers, base_cfg["num_attention_heads"], _kv_heads(base_cfg), base_cfg["intermediate_size"])


def shape_like(base_cfg: dict, name: str) -> ScaledShape:
    """The shape that costs like ``NAMED[name]`` (see the module doc): its layers, its q and KV widths in the
    base's head size, and the MLP width (a multiple of 256) that brings the parameters to its count."""
    named = NAMED[name]
    d = _head_dim(base_cfg)
    q_width = named["num_attention_heads"] * named["head_dim"]
    kv_width = named["num_key_value_heads"] * named["head_dim"]
    if q_width % d or kv_width % d:
        raise ValueError(f"{name}'s attention widths ({q_width}, {kv_width}) are not multiples of the base's "
                         f"head size {d}")
    no_mlp = dict(base_cfg, num_hidden_layers=named["num_hidden_layers"], num_attention_heads=q_width // d,
                  num_key_value_heads=kv_width // d, intermediate_size=0)
    per_unit = 3 * base_cfg["hidden_size"] * named["num_hidden_layers"]
    inter = round((param_count(named) - param_count(no_mlp)) / per_unit / 256) * 256
    return ScaledShape(named["num_hidden_layers"], q_width // d, kv_width // d,
                       max(inter, base_cfg["intermediate_size"]))


def check_shape(base_cfg: dict, shape: ScaledShape) -> None:
    """Raise ValueError (naming the field) when ``shape`` cannot hold the base model."""
    heads, kv = base_cfg["num_attention_heads"], _kv_heads(base_cfg)
    least = {"layers": base_cfg["num_hidden_layers"], "heads": heads, "kv_heads": kv,
             "intermediate_size": base_cfg["intermediate_size"]}
    for name, value in least.items():
        if getattr(shape, name) < value:
            raise ValueError(f"{name} must be at least the base's {value}, got {getattr(shape, name)}")
    if shape.heads * kv != shape.kv_heads * heads:
        # The attention kernels may multiply a KV head's query heads together: another group size would
        # change the shapes they multiply, and with them the last bits.
        raise ValueError(f"heads / kv_heads must be the base's {heads // kv} query heads per KV head, got "
                         f"{shape.heads} / {shape.kv_heads}")


def scaled_config(base_cfg: dict, shape: ScaledShape, dtype: str = "bfloat16", note: Optional[dict] = None) -> dict:
    """The base's config.json in the scaled shape (and a ``ddtree_cost_scaled`` note that says what it is:
    transformers keeps an unknown key as an attribute)."""
    check_shape(base_cfg, shape)
    cfg = dict(base_cfg, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
               num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate_size,
               head_dim=_head_dim(base_cfg), dtype=dtype)
    if "layer_types" in cfg:
        cfg["layer_types"] = ["full_attention"] * shape.layers
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = shape.layers
    cfg["ddtree_cost_scaled"] = {
        "what": "NOT A REAL MODEL: the base target's logits and hidden states exactly, plus dead weight (outputs "
                "multiplied by zero) that makes its forward cost like a larger model",
        "base_layers": base_cfg["num_hidden_layers"], "base_heads": base_cfg["num_attention_heads"],
        "base_kv_heads": _kv_heads(base_cfg), "base_intermediate_size": base_cfg["intermediate_size"],
        **(note or {})}
    return cfg


def disk_bytes(base_cfg: dict, shape: ScaledShape, dtype: str) -> int:
    """Size of the weights :func:`write_scaled_target` writes (tensor data, no headers)."""
    return param_count(scaled_config(base_cfg, shape)) * getattr(torch, dtype).itemsize


# ---- where the base's units go: probed on this CPU's BLAS ------------------------------------------

# Row counts the probe tries: one-token decoding, small and large trees and batches, prefills.
PROBE_ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 64, 65, 128, 129, 256, 257, 512, 1024, 2049)


def _exact_padded(pieces: list[tuple[int, int, int]], K0: int, K: int, N: int, g: torch.Generator) -> bool:
    """Whether ``F.linear`` over ``K`` inputs, the real ``K0`` placed by ``pieces`` (source start, source
    end, destination start) and zero weights elsewhere, gives the bits of the ``K0``-input product, for
    every row count in :data:`PROBE_ROWS`, with one thread and with torch's current threads."""
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    try:
        for n_threads in sorted({1, threads}):
            torch.set_num_threads(n_threads)
            for M in PROBE_ROWS:
                x0, w0 = torch.randn(M, K0, generator=g), torch.randn(N, K0, generator=g)
                x, w = torch.randn(M, K, generator=g), torch.zeros(N, K)  # extra activations are real numbers
                for a, b, d in pieces:
                    x[:, d:d + b - a], w[:, d:d + b - a] = x0[:, a:b], w0[:, a:b]
                if not torch.equal(F.linear(x0, w0), F.linear(x, w)):
                    return False
    finally:
        torch.set_num_threads(threads)
    return True


def mlp_layout(K0: int, K: int, N: int) -> Optional[list[tuple[int, int, int]]]:
    """Where the base's ``K0`` MLP units go among ``K`` (as (source start, source end, destination start)
    pieces) so that ``down_proj`` (``N`` outputs) sums them exactly as the base does, on this CPU's BLAS:
    contiguous at the start, else two halves with a gap of 32..512 zero columns between them (the first
    that is exact); ``None`` when none is."""
    if K == K0:
        return [(0, K0, 0)]
    g = torch.Generator().manual_seed(0)
    half = K0 // 2
    candidates = [[(0, K0, 0)]] + [[(0, half, 0), (half, K0, half + gap)] for gap in range(32, 513, 32)
                                   if K0 + gap <= K]
    return next((c for c in candidates if _exact_padded(c, K0, K, N, g)), None)


def attention_layout_exact(K0: int, K: int, N: int) -> bool:
    """Whether ``o_proj`` over ``K`` head columns, the base's ``K0`` first, sums exactly as the base does."""
    return K == K0 or _exact_padded([(0, K0, 0)], K0, K, N, torch.Generator().manual_seed(1))


# ---- the weights -----------------------------------------------------------------------------------


def _layer(i: int, base: dict, base_cfg: dict, shape: ScaledShape, mlp_pieces, gen: torch.Generator,
           dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer ``i``'s tensors: random q/k/v/gate/up (work that is really done), unit norms, zero o_proj and
    down_proj, with the base layer's weights written in (``i < base layers``) where they belong."""
    H, d, I = base_cfg["hidden_size"], _head_dim(base_cfg), shape.intermediate_size
    p = f"model.layers.{i}."

    def rand(*size):
        return (torch.randn(size, generator=gen) * INIT_STD).to(dtype)

    t = {
        p + "self_attn.q_proj.weight": rand(shape.heads * d, H),
        p + "self_attn.k_proj.weight": rand(shape.kv_heads * d, H),
        p + "self_attn.v_proj.weight": rand(shape.kv_heads * d, H),
        p + "self_attn.o_proj.weight": torch.zeros(H, shape.heads * d, dtype=dtype),
        p + "self_attn.q_norm.weight": torch.ones(d, dtype=dtype),
        p + "self_attn.k_norm.weight": torch.ones(d, dtype=dtype),
        p + "mlp.gate_proj.weight": rand(I, H),
        p + "mlp.up_proj.weight": rand(I, H),
        p + "mlp.down_proj.weight": torch.zeros(H, I, dtype=dtype),
        p + "input_layernorm.weight": torch.ones(H, dtype=dtype),
        p + "post_attention_layernorm.weight": torch.ones(H, dtype=dtype),
    }
    if i >= base_cfg["num_hidden_layers"]:
        return t
    b = {k[len(p):]: v for k, v in base.items() if k.startswith(p)}
    for name in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
        t[p + name + ".weight"] = b[name + ".weight"]
    q, o = t[p + "self_attn.q_proj.weight"], t[p + "self_attn.o_proj.weight"]
    # The base's heads keep their indices (same group size: query head h still reads KV head h // group).
    q[:b["self_attn.q_proj.weight"].shape[0]] = b["self_attn.q_proj.weight"]
    o[:, :b["self_attn.o_proj.weight"].shape[1]] = b["self_attn.o_proj.weight"]
    kv = b["self_attn.k_proj.weight"].shape[0]
    t[p + "self_attn.k_proj.weight"][:kv] = b["self_attn.k_proj.weight"]
    t[p + "self_attn.v_proj.weight"][:kv] = b["self_attn.v_proj.weight"]
    for a, e, dst in mlp_pieces:
        t[p + "mlp.gate_proj.weight"][dst:dst + e - a] = b["mlp.gate_proj.weight"][a:e]
        t[p + "mlp.up_proj.weight"][dst:dst + e - a] = b["mlp.up_proj.weight"][a:e]
        t[p + "mlp.down_proj.weight"][:, dst:dst + e - a] = b["mlp.down_proj.weight"][:, a:e]
    return t


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


class NoExactLayout(ValueError):
    """This CPU's BLAS sums the widened base layers in another order for every placement tried."""


def write_scaled_target(base_dir, out_dir, shape: ScaledShape, dtype: str = "bfloat16", seed: int = 0,
                        like: Optional[str] = None) -> dict:
    """Write the cost-scaled target of ``base_dir`` (a Qwen3 checkpoint folder) in ``shape`` to ``out_dir``
    (created if needed): ``config.json``, the base's other files (tokenizer, generation settings) and
    safetensors shards of about :data:`SHARD_BYTES` (with an index when more than one). The extra weights
    are ``N(0, INIT_STD)`` draws from a generator seeded with ``seed``; everything is stored in ``dtype``.
    Raises :class:`NoExactLayout` (before writing anything) when the widened base layers would not be exact
    on this CPU. Returns the config written."""
    from safetensors.torch import save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    base_cfg = json.loads((base_dir / "config.json").read_text())
    if base_cfg.get("model_type") != "qwen3":
        raise ValueError(f"the base must be a Qwen3 checkpoint, got model_type {base_cfg.get('model_type')!r}")
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    check_shape(base_cfg, shape)
    H, d = base_cfg["hidden_size"], _head_dim(base_cfg)
    pieces = mlp_layout(base_cfg["intermediate_size"], shape.intermediate_size, H)
    if pieces is None or not attention_layout_exact(base_cfg["num_attention_heads"] * d, shape.heads * d, H):
        raise NoExactLayout(f"on this CPU's BLAS ({torch.backends.cpu.get_cpu_capability()}) no placement tried "
                            f"keeps the widened base layers bit-exact; use extra layers of the base's shape instead")
    cfg = scaled_config(base_cfg, shape, dtype, note={"like": like, "seed": seed, "base_mlp_units": pieces})
    tdtype = getattr(torch, dtype)
    base = {k: _exact(k, v, tdtype) for k, v in _load_base(base_dir).items()}
    gen = torch.Generator().manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Whole layers per shard, in order, the first also holding the embedding, final norm and LM head.
    # Each shard is built, written and dropped before the next.
    layer_bytes = layer_params(cfg) * tdtype.itemsize
    per_shard = max(1, SHARD_BYTES // layer_bytes)
    count = math.ceil(shape.layers / per_shard)
    weight_map, total = {}, 0
    for j in range(count):
        name = f"model-{j + 1:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors"
        shard = {k: v for k, v in base.items() if not k.startswith("model.layers.")} if j == 0 else {}
        for i in range(j * per_shard, min((j + 1) * per_shard, shape.layers)):
            shard.update(_layer(i, base, base_cfg, shape, pieces, gen, tdtype))
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
