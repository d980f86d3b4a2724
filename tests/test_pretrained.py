"""The trained pair shipped in the package (ddtree/pretrained/stdlib-char, made by ``ddtree train``), with
both its drafters (block sizes 8 and 16): on held-out text each drafter is actually useful, and speculative
decoding with it stays exactly the target's own greedy decoding."""
from __future__ import annotations

import pytest
import torch

from ddtree import decode, demo, train
from ddtree.drafter import DFlashDrafter
from ddtree.target import load_target


@pytest.fixture(scope="module", params=[8, 16], ids=["block8", "block16"])
def pair(request):
    tdir, ddir = demo.pretrained_pair(request.param)
    target = load_target(tdir)
    drafter = DFlashDrafter.from_pretrained(ddir, dtype=target.dtype)
    assert drafter.block_size == request.param
    _, held = train.load_corpus(held_out_only=True)
    g = torch.Generator().manual_seed(123)
    starts = torch.randint(0, held.numel() - 100, (6,), generator=g).tolist()
    lens = [64, 48, 80, 64, 33, 72]  # ragged prompts
    prompts = [held[s : s + n].tolist() for s, n in zip(starts, lens)]
    return tdir, target, drafter, prompts


def _hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    x = torch.tensor([prompt])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_acceptance_on_held_out_text(pair):
    _, target, drafter, prompts = pair
    acc = {}
    for method in ("dflash", "ddtree"):
        out = decode.generate(target, drafter, prompts, method=method, max_new_tokens=64, max_nodes=64)
        acc[method] = out.acceptance_length
    assert acc["dflash"] >= 2.5, acc
    assert acc["ddtree"] >= acc["dflash"] + 0.5, acc  # the tree at 64 nodes clearly beats the chain


def test_every_method_is_the_targets_greedy_decoding(pair):
    tdir, target, drafter, prompts = pair
    hf = target.model
    hf.generation_config.eos_token_id = None
    want = [_hf_greedy(hf, p, 40) for p in prompts[:3]]
    for method in decode.METHODS:
        out = decode.generate(target, drafter, prompts[:3], method=method, max_new_tokens=40, max_nodes=64)
        assert out.tokens == want, method


def test_train_info_records_the_recipe():
    import json

    info = json.loads((demo.PRETRAINED / "train_info.json").read_text())
    assert info["command"].startswith("ddtree train")
    assert info["seed"] == 0 and info["python"] and info["seconds"]["total"] > 0
    assert all(v["same_as_ar"] for v in info["acceptance_held_out"].values())


def test_block16_drafter_records_its_drafter_only_run():
    """The block-16 drafter was trained by the recipe's drafter-only mode for the shipped target as it is."""
    import hashlib
    import json

    tdir, ddir = demo.pretrained_pair(16)
    info = json.loads((ddir / "train_info.json").read_text())
    assert info["command"].startswith("ddtree train --target") and "--block-size 16" in info["command"]
    assert info["target"]["model_sha256"] == hashlib.sha256((tdir / "model.safetensors").read_bytes()).hexdigest()
    assert info["drafter"]["block_size"] == 16 and info["seed"] == 0 and info["seconds"]["total"] > 0
    table = info["acceptance_held_out"]
    assert {"dflash", "ddtree-16", "ddtree-64", "ddtree-256", "caddtree"} <= set(table)
    assert all(v["same_as_ar"] for v in table.values())
