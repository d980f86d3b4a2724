"""The DFlash drafter: the published checkpoint layout, and its cached, batched forward against a
transcription of the reference forward built from transformers' Qwen3 pieces (no cache, one request)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddtree.drafter import DFlashConfig, DFlashDrafter, default_target_layer_ids
from ddtree.target import HFTarget

from models import tiny_drafter, tiny_target

TOL = dict(atol=2e-5, rtol=2e-5)


def _hf_norm(x, w, eps):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    n = Qwen3RMSNorm(w.shape[0], eps)
    n.weight.data.copy_(w)
    return n(x)


def reference_draft(drafter: DFlashDrafter, target, feats: torch.Tensor, root: int) -> torch.Tensor:
    """DFlash's forward as published (cache-free): feats ``[C, F]`` of positions ``0..C-1``; the block
    ``[root, MASK...]`` at ``C..C+bs-1``; keys/values over ``[context ; block]``, non-causal. -> ``[D, V]``."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, rotate_half

    cfg, eps = drafter.cfg, drafter.cfg.rms_norm_eps
    C, bs, d = feats.shape[0], cfg.block_size, cfg.head_dim
    rope = Qwen3RotaryEmbedding(Qwen3Config(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                                            head_dim=d, rope_theta=cfg.rope_theta))
    th = _hf_norm(torch.nn.functional.linear(feats[None], drafter.fc.weight), drafter.hidden_norm.weight, eps)
    h = target.embed(torch.tensor([[root] + [cfg.mask_token_id] * (bs - 1)]))
    cos, sin = rope(h, torch.arange(C + bs)[None])
    cos, sin = cos[:, None], sin[:, None]
    for layer in drafter.layers:
        a = layer.self_attn
        x = _hf_norm(h, layer.input_layernorm.weight, eps)
        q = _hf_norm(a.q_proj(x).view(1, bs, -1, d), a.q_norm.weight, eps).transpose(1, 2)
        k = torch.cat([a.k_proj(th), a.k_proj(x)], 1).view(1, C + bs, -1, d)
        k = _hf_norm(k, a.k_norm.weight, eps).transpose(1, 2)
        v = torch.cat([a.v_proj(th), a.v_proj(x)], 1).view(1, C + bs, -1, d).transpose(1, 2)
        q = q * cos[..., -bs:, :] + rotate_half(q) * sin[..., -bs:, :]  # queries: the block's positions
        k = k * cos + rotate_half(k) * sin
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # no mask: non-causal
        h = h + a.o_proj(o.transpose(1, 2).reshape(1, bs, -1))
        h = h + layer.mlp(_hf_norm(h, layer.post_attention_layernorm.weight, eps))
    return target.lm_head(_hf_norm(h[0, 1:], drafter.norm.weight, eps))


@pytest.mark.parametrize("block_size", [4, 7])
def test_cached_batched_draft_matches_reference(block_size):
    model = tiny_target("qwen3", seed=11)
    target = HFTarget(model)
    drafter = tiny_drafter(model.config, block_size=block_size, num_layers=2, seed=12)
    F = len(drafter.target_layer_ids) * model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    B, S = 3, 40
    chunks = [[6, 2, 9], [3, 1, 0], [1, 4, 2]]  # new context tokens per request and round (0: finished row)
    all_feats = torch.randn(B, sum(max(c) for c in chunks), F, generator=g)
    drafter.reset(B, S)
    seen = [0] * B
    for rnd, lens in enumerate(chunks):
        P = max(lens)
        start = sum(max(c) for c in chunks[:rnd])
        # Row b's new features are all_feats[b, start : start + lens[b]]; the padding is garbage on purpose.
        feats = all_feats[:, start : start + P].clone()
        roots = torch.randint(model.config.vocab_size, (B,), generator=g)
        logits = drafter.draft(target, roots, feats, torch.tensor(lens))
        assert logits.shape == (B, block_size - 1, model.config.vocab_size) and logits.dtype == torch.float32
        for b in range(B):
            history = [all_feats[b, sum(max(c) for c in chunks[:r]) :][: chunks[r][b]] for r in range(rnd + 1)]
            seen[b] += lens[b]
            with torch.no_grad():
                ref = reference_draft(drafter, target, torch.cat(history), int(roots[b]))
            torch.testing.assert_close(logits[b], ref, **TOL)
        # The context cache grows by the new (accepted) tokens only, not by the block.
        assert drafter.context_lens.tolist() == seen


def test_checkpoint_layout_round_trip(tmp_path):
    model = tiny_target("llama", seed=13)
    drafter = tiny_drafter(model.config, block_size=5, num_layers=2, seed=14)
    drafter.save_pretrained(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"]
    assert cfg["block_size"] == 5 and cfg["num_target_layers"] == 2 and cfg["num_hidden_layers"] == 2
    assert cfg["dflash_config"] == {"target_layer_ids": [0, 1], "mask_token_id": drafter.mask_token_id}
    H = model.config.hidden_size
    weights = load_file(str(tmp_path / "d" / "model.safetensors"))
    expected = {"fc.weight", "hidden_norm.weight", "norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in [
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
            "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
            "post_attention_layernorm"]}
    assert set(weights) == expected
    assert weights["fc.weight"].shape == (H, 2 * H)

    loaded = DFlashDrafter.from_pretrained(tmp_path / "d")
    for k, v in drafter.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.cfg.target_layer_ids == [0, 1] and loaded.block_size == 5

    # A checkpoint whose keys carry a "model." prefix and whose config names no layers also loads.
    save_file({"model." + k: v for k, v in weights.items()}, str(tmp_path / "d" / "model.safetensors"))
    del cfg["dflash_config"]["target_layer_ids"]
    cfg["num_target_layers"] = 36
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    again = DFlashDrafter.from_pretrained(tmp_path / "d")
    assert again.cfg.target_layer_ids == default_target_layer_ids(36, 2) == [1, 33]
    assert torch.equal(again.fc.weight, drafter.fc.weight)


def test_config_errors():
    base = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                vocab_size=99, block_size=4, num_target_layers=2)
    with pytest.raises(ValueError, match="mask_token_id"):
        DFlashConfig.from_dict({**base, "dflash_config": {"target_layer_ids": [0]}})
    with pytest.raises(ValueError, match="RoPE"):
        DFlashConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn"}, "dflash_config": {"mask_token_id": 2}})
    cfg = DFlashConfig.from_dict({**base, "dflash_config": {"target_layer_ids": [1], "mask_token_id": 2}})
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 4
