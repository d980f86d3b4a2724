"""The training recipe (ddtree.train): its batched, differentiable drafter forward is the decode-time
drafter, the corpus split is stable, and a few steps of each stage lower the loss."""
from __future__ import annotations

import torch

from ddtree import train
from ddtree.drafter import DFlashConfig, DFlashDrafter
from ddtree.target import HFTarget
from ddtree.tiny import MASK_ID

from models import tiny_drafter, tiny_target


def test_block_logits_equal_cached_draft():
    """Several blocks per sequence under one mask == one cached ``draft`` per (request, anchor)."""
    target = tiny_target("qwen3", seed=3)
    L = target.config.num_hidden_layers
    drafter = tiny_drafter(target.config, block_size=5, target_layer_ids=[0, L - 1], seed=4)
    runner = HFTarget(target)
    runner.set_feature_layers(drafter.target_layer_ids)
    g = torch.Generator().manual_seed(0)
    B, S = 3, 24
    tokens = torch.randint(3, target.config.vocab_size, (B, S), generator=g)
    hooks = train._FeatureHooks(target, drafter.target_layer_ids)
    with torch.no_grad():
        feats = hooks(target, tokens)
        anchors = torch.tensor([[0, 7, 19], [3, 3, 12], [18, 1, 9]])  # a repeat and a context of length 0
        got = train.drafter_block_logits(drafter, runner.embed, runner.lm_head, feats, tokens, anchors)
    hooks.remove()
    for b in range(B):
        for j, a in enumerate(anchors[b].tolist()):
            drafter.reset(1, S + drafter.block_size)
            want = drafter.draft(runner, tokens[b : b + 1, a], feats[b : b + 1, :a], torch.tensor([a]))
            torch.testing.assert_close(got[b, j], want[0], atol=2e-5, rtol=2e-5)


def test_split_is_by_path_and_stable():
    files = train.stdlib_files()
    assert len(files) > 100
    held = [rel for rel, _ in files if train.is_held_out(rel)]
    assert 0 < len(held) < len(files) / 5
    assert train.is_held_out(held[0]) and all(train.is_held_out(r) == train.is_held_out(r) for r, _ in files[:50])
    assert not any("/test/" in f"/{rel}" for rel, _ in files)


def test_a_few_steps_lower_both_losses():
    torch.manual_seed(0)
    ids = torch.randint(3, 40, (4000,))
    ids[1::2] = ids[0::2] + 1  # learnable structure: every odd token follows from the one before
    shape = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32)
    t0 = train.train_target(ids, 0, batch=8, seq=32, **shape)
    before = train.target_loss(t0, ids, n=8, seq=32)
    target = train.train_target(ids, 60, batch=8, seq=32, log=lambda *_: None, **shape)
    assert train.target_loss(target, ids, n=8, seq=32) < before - 0.5

    seqs = ids[: 16 * 40].view(16, 40)
    logs = []
    drafter = DFlashDrafter(DFlashConfig.for_target(target.config, num_layers=1, block_size=4,
                                                    mask_token_id=MASK_ID, target_layer_ids=[0]))
    train.train_drafter(target, drafter, seqs, prompt_len=8, steps=60, batch=8, anchors_per_seq=4, log=logs.append)
    first, last = (float(line.split("loss")[1].split()[0]) for line in (logs[0], logs[-1]))
    assert last < first - 0.5
    assert isinstance(drafter, DFlashDrafter) and not drafter.training


def test_a_saved_target_gives_the_recipes_greedy_corpus(tmp_path):
    """The drafter-only mode (``--target``) loads the saved bf16 target as the fp32 model the recipe itself
    ran after rounding to bf16: the same greedy continuations, so the same training text for the drafter."""
    torch.manual_seed(0)
    ids = torch.randint(3, 40, (2000,))
    shape = dict(hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, head_dim=64)
    target = train.train_target(ids, 20, batch=4, seq=32, log=lambda *_: None, **shape)
    target = target.to(torch.bfloat16).to(torch.float32)  # as the recipe does before its greedy corpus
    want = train.greedy_corpus(target, ids, 6, prompt_len=8, new_tokens=24, seed=1)
    target.to(torch.bfloat16).save_pretrained(tmp_path / "target")
    got = train.greedy_corpus(train.load_trained_target(tmp_path / "target"), ids, 6, prompt_len=8, new_tokens=24,
                              seed=1)
    assert torch.equal(got, want)


def test_drafter_only_mode_trains_a_drafter_for_the_shipped_target(tmp_path):
    """``ddtree train --target DIR``: the target's files are unchanged, --out is a drafter folder of the
    asked block size that decodes exactly like the target, with its record."""
    import hashlib
    import json

    from ddtree import demo

    weights = demo.PRETRAINED / "target" / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = tmp_path / "drafter-b4"
    code = train.main(["--target", str(demo.PRETRAINED / "target"), "--block-size", "4", "--drafter-steps", "3",
                       "--greedy-seqs", "4", "--out", str(out)])
    assert code == 0
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before
    drafter = DFlashDrafter.from_pretrained(out)
    assert drafter.block_size == 4 and drafter.target_layer_ids == [1, 2]  # the recipe's layers for 4 target layers
    info = json.loads((out / "train_info.json").read_text())
    assert info["command"].startswith("ddtree train --target") and info["seed"] == 0
    assert info["target"]["model_sha256"] == before
    assert info["drafter"]["block_size"] == 4 and info["drafter"]["steps"] == 3
    table = info["acceptance_held_out"]
    assert set(table) == {"ar", "dflash", "ddtree-16", "ddtree-64", "ddtree-256", "caddtree"}
    assert all(row["same_as_ar"] for row in table.values())
    assert table["dflash"]["mean_tree_size"] == 3 and table["ddtree-16"]["mean_tree_size"] == 16
