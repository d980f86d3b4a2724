"""The recipe for the tiny trained pair that ``ddtree demo`` and the end-to-end tests use by default.

``ddtree train --out DIR`` (or ``python -m ddtree.train``) trains, on any machine and offline:

1. a character-level Qwen3 target LM on the Python standard library's own source files (every Python
   install has them); files are split into train and held-out by a hash of their path relative to the
   stdlib, so the split does not depend on the machine;
2. a DFlash drafter for that target with the block-diffusion objective: the block ``[x_p, MASK * D]`` at
   an anchor position ``p`` is predicted in one pass from the target's hidden features of the context
   ``x_0..x_{p-1}``. Its training text is the target's own greedy continuations of train prompts, so the
   drafter learns what it will be asked to predict (the target's greedy choices), not the corpus.

``ddtree train --target DIR --block-size 16 --out DIR`` trains only step 2 for a target already trained
(the shipped one, say), leaving it unchanged: the target's greedy corpus is regenerated exactly as the
recipe makes it, and ``--out`` becomes the drafter folder with its own ``train_info.json``.

Everything is seeded. The corpus depends on the Python version's stdlib (the shipped pair records the
version it was trained on in ``train_info.json``). :func:`drafter_block_logits` is the differentiable
batched twin of :meth:`DFlashDrafter.draft` (several blocks per sequence under one attention mask);
a test checks they agree.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .drafter import DFlashConfig, DFlashDrafter
from .layers import rope
from .tiny import CHARS, EOS_ID, MASK_ID, SPECIALS, char_tokenizer, target_config
HELD_OUT_EVERY = 20  # one file in 20 (by path hash) is held out


# ---- corpus ----------------------------------------------------------------------------------------


def _encode_table() -> torch.Tensor:
    """byte -> token id; bytes outside the tokenizer's characters map to -1 (dropped)."""
    table = torch.full((256,), -1, dtype=torch.long)
    for i, ch in enumerate(CHARS):
        table[ord(ch)] = len(SPECIALS) + i
    table[ord("\t")] = len(SPECIALS) + CHARS.index(" ")
    return table


def stdlib_files() -> list[tuple[str, Path]]:
    """(path relative to the stdlib, path) of the stdlib's ``.py`` files, tests and site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo"):
            continue
        if any(part in ("test", "tests") for part in parts):
            continue
        out.append((rel, p))
    return out


def is_held_out(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def load_corpus(max_bytes: int | None = None, held_out_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids) as 1-D i64 tensors: files concatenated, each followed by ``<eos>``
    (train ids empty with ``held_out_only``)."""
    table = _encode_table()
    parts: dict[bool, list[torch.Tensor]] = {False: [torch.empty(0, dtype=torch.long)], True: []}
    for rel, p in stdlib_files():
        if held_out_only and not is_held_out(rel):
            continue
        raw = p.read_bytes()
        if not raw:
            continue
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        ids = table[data]
        ids = ids[ids >= 0]
        parts[is_held_out(rel)].append(torch.cat([ids, torch.tensor([EOS_ID])]))
    train, held = torch.cat(parts[False]), torch.cat(parts[True])
    if max_bytes is not None:
        train = train[:max_bytes]
    return train, held


def _windows(ids: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - length, (n,), generator=gen)
    return ids[starts[:, None] + torch.arange(length)]


# ---- target ----------------------------------------------------------------------------------------


def train_target(train_ids: torch.Tensor, steps: int, batch: int = 24, seq: int = 192, lr: float = 3e-3,
                 seed: int = 0, log=print, **config_kw):
    """A char-level Qwen3 causal LM (AdamW, linear warm-up then cosine decay)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = target_config("qwen3", init_std=0.02, **config_kw)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = _schedule(opt, steps)
    t0 = time.perf_counter()
    for step in range(steps):
        x = _windows(train_ids, batch, seq, gen)
        loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels
        _step(opt, sched, loss)
        if step % 50 == 0 or step == steps - 1:
            log(f"target step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - t0:6.0f}s")
    return model.eval()


@torch.no_grad()
def target_loss(model, ids: torch.Tensor, n: int = 64, seq: int = 192, seed: int = 1) -> float:
    x = _windows(ids, n, seq, torch.Generator().manual_seed(seed))
    return float(model(input_ids=x, labels=x).loss)


@torch.no_grad()
def greedy_corpus(model, train_ids: torch.Tensor, n: int, prompt_len: int, new_tokens: int, seed: int,
                  batch: int = 64) -> torch.Tensor:
    """``[n, prompt_len + new_tokens]``: train prompts followed by the target's greedy continuation."""
    gen = torch.Generator().manual_seed(seed)
    prompts = _windows(train_ids, n, prompt_len, gen)
    model.generation_config.eos_token_id = None  # keep going past <eos>, as decoding with stop tokens off does
    out = []
    for i in range(0, n, batch):
        p = prompts[i : i + batch]
        seqs = model.generate(p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=new_tokens,
                              pad_token_id=0)
        out.append(seqs)
    return torch.cat(out)


# ---- drafter ---------------------------------------------------------------------------------------


class _FeatureHooks:
    """The outputs of chosen decoder layers, captured exactly as :class:`ddtree.target.HFTarget` does."""

    def __init__(self, model, layer_ids: list[int]):
        self.layer_ids, self.captured, self.handles = layer_ids, {}, []
        layers = model.get_decoder().layers
        for i in layer_ids:
            self.handles.append(layers[i].register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def hook(module, args, output):
            self.captured[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def __call__(self, model, ids: torch.Tensor) -> torch.Tensor:
        self.captured.clear()
        model.get_decoder()(input_ids=ids)
        return torch.cat([self.captured[i] for i in self.layer_ids], dim=-1)

    def remove(self):
        for h in self.handles:
            h.remove()


def drafter_block_logits(drafter: DFlashDrafter, embed, lm_head, features: torch.Tensor, tokens: torch.Tensor,
                         anchors: torch.Tensor) -> torch.Tensor:
    """Differentiable drafting of several blocks per sequence in one pass.

    features ``[B, L, F]``: target features of ``tokens[:, :L]``; tokens ``[B, L']`` (``L' >= L``) i64;
    anchors ``[B, m]``: block ``j`` is ``[tokens[b, a], MASK * D]`` at positions ``a..a+D`` and sees the
    context features of positions ``< a`` and its own block (bidirectionally), exactly like
    :meth:`DFlashDrafter.draft` with ``context_len = a``. Returns logits ``[B, m, D, V]``.
    """
    cfg = drafter.cfg
    B, L, _ = features.shape
    m, bs = anchors.shape[1], cfg.block_size
    dev = features.device
    c = drafter.hidden_norm(drafter.fc(features))  # [B, L, H]
    ctx_pos = torch.arange(L, device=dev).expand(B, L)
    roots = tokens.gather(1, anchors)  # [B, m]
    block = torch.cat([roots[..., None], torch.full((B, m, bs - 1), cfg.mask_token_id, device=dev)], -1)
    block_pos = (anchors[..., None] + torch.arange(bs, device=dev)).reshape(B, m * bs)
    x = embed(block.reshape(B, m * bs))
    # Visibility: context key l < anchor of the query's block; block keys of the same block.
    q_block = torch.arange(m * bs, device=dev) // bs
    sees_ctx = torch.arange(L, device=dev)[None, None] < anchors.repeat_interleave(bs, 1)[..., None]  # [B, mbs, L]
    sees_blk = (q_block[:, None] == q_block[None, :]).expand(B, -1, -1)
    mask = torch.cat([sees_ctx, sees_blk], dim=-1)[:, None]  # [B, 1, mbs, L + mbs]
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer in drafter.layers:
        attn, h = layer.self_attn, layer.input_layernorm(x)
        q = attn.q_norm(attn.q_proj(h).view(B, m * bs, -1, attn.head_dim)).transpose(1, 2)
        q = rope(q, block_pos, cfg.rope_theta)
        kc, vc = attn.kv(c, ctx_pos)
        kb, vb = attn.kv(h, block_pos)
        k = torch.cat([kc, kb], 2).repeat_interleave(groups, 1)
        v = torch.cat([vc, vb], 2).repeat_interleave(groups, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.head_dim**-0.5)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(B, m * bs, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = lm_head(drafter.norm(x))  # [B, m*bs, V]
    return logits.view(B, m, bs, -1)[:, :, 1:]


def train_drafter(target, drafter: DFlashDrafter, seqs: torch.Tensor, prompt_len: int, steps: int, batch: int = 32,
                  anchors_per_seq: int = 8, lr: float = 3e-3, seed: int = 0, log=print) -> DFlashDrafter:
    """Block-diffusion objective on the target's greedy text ``seqs``: cross-entropy of each block's
    positions ``1..D`` against the tokens that follow its anchor (the target's greedy tokens)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    target.requires_grad_(False)
    hooks = _FeatureHooks(target, drafter.target_layer_ids)
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    drafter.train()
    opt = torch.optim.AdamW(drafter.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = _schedule(opt, steps)
    N, S = seqs.shape
    D = drafter.block_size - 1
    t0 = time.perf_counter()
    for step in range(steps):
        rows = seqs[torch.randint(0, N, (batch,), generator=gen)]
        with torch.no_grad():
            feats = hooks(target, rows)
        # Anchors in the greedy part: the root x_a may be the last prompt token, the block must fit.
        anchors = torch.randint(prompt_len - 1, S - D, (batch, anchors_per_seq), generator=gen)
        logits = drafter_block_logits(drafter, embed, lm_head, feats, rows, anchors)
        labels = rows.gather(1, (anchors[..., None] + torch.arange(1, D + 1)).reshape(batch, -1)).view_as(logits[..., 0])
        # Later depths matter only when every earlier one was accepted: weight them down geometrically.
        w = 0.8 ** torch.arange(D, dtype=torch.float32)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        loss = (ce.view(batch, anchors_per_seq, D) * w).sum(-1).mean() / w.sum()
        _step(opt, sched, loss)
        if step % 50 == 0 or step == steps - 1:
            with torch.no_grad():
                acc = (logits.argmax(-1) == labels).float().mean((0, 1))
            log(f"drafter step {step:5d}  loss {loss.item():.3f}  top-1 acc by depth "
                f"{' '.join(f'{a:.2f}' for a in acc.tolist())}  {time.perf_counter() - t0:6.0f}s")
    hooks.remove()
    return drafter.eval()


def _step(opt, sched, loss: torch.Tensor) -> None:
    """One optimiser step with gradients clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    sched.step()


def _schedule(opt, steps: int, warmup: int = 50):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


# ---- evaluation and the whole recipe --------------------------------------------------------------


def evaluate(target_dir: Path, drafter_dir: Path, held_ids: torch.Tensor, prompts: int = 8, prompt_len: int = 64,
             new_tokens: int = 96, max_nodes: int = 64, seed: int = 0, budgets: Sequence[int] = (64,),
             cost_model=None) -> dict:
    """Acceptance length per method on held-out prompts, and whether every method's output equals AR.

    Keys: ``ar``, ``dflash``, ``ddtree-N`` per node budget in ``budgets``, ``caddtree`` (cap ``max_nodes``,
    priced by ``cost_model``; ``None``: the built-in estimate)."""
    from . import decode
    from .target import load_target

    target = load_target(target_dir)
    drafter = DFlashDrafter.from_pretrained(drafter_dir, dtype=target.dtype)
    x = _windows(held_ids, prompts, prompt_len, torch.Generator().manual_seed(seed)).tolist()
    runs = [("ar", "ar", max_nodes), ("dflash", "dflash", max_nodes)]
    runs += [(f"ddtree-{n}", "ddtree", n) for n in budgets] + [("caddtree", "caddtree", max_nodes)]
    result, ref = {}, None
    for name, method, nodes in runs:
        out = decode.generate(target, drafter, x, method=method, max_new_tokens=new_tokens, max_nodes=nodes,
                              cost_model=cost_model)
        ref = out.tokens if method == "ar" else ref
        result[name] = {"acceptance_length": round(out.acceptance_length, 3),
                        "mean_tree_size": round(out.mean_tree_size, 2), "same_as_ar": out.tokens == ref}
    return result


GREEDY_PROMPT, GREEDY_NEW = 64, 128  # the drafter's training text: 64 train characters + 128 greedy ones
TARGET_DEFAULTS = {"target_steps": 2000, "hidden": 128, "layers": 4}  # the options that shape the target


def new_drafter(target_config, block_size: int) -> DFlashDrafter:
    """The recipe's drafter for a target: one layer, reading target layers ``L/2 - 1`` and ``L - 2``."""
    L = target_config.num_hidden_layers
    return DFlashDrafter(DFlashConfig.for_target(target_config, num_layers=1, block_size=block_size,
                                                 mask_token_id=MASK_ID, target_layer_ids=[max(0, L // 2 - 1), L - 2]))


def load_trained_target(folder: Path):
    """A target saved by the recipe (bf16), as the fp32 model the recipe itself ran after rounding it to
    bf16: the same weights, so the same greedy corpus."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(args, argv, train_ids, held_ids) -> dict:
    return {
        "command": "ddtree train " + " ".join(sys.argv[1:] if argv is None else argv),
        "python": platform.python_version(), "torch": torch.__version__, "seed": args.seed,
        "corpus": f"Python stdlib .py files (tests, idlelib, lib2to3, tkinter excluded); held out: sha1(path) % "
                  f"{HELD_OUT_EVERY} == 0", "train_chars": train_ids.numel(), "held_out_chars": held_ids.numel(),
    }


def _print_acceptance(table: dict) -> None:
    for name, r in table.items():
        print(f"  {name:10s} acceptance length {r['acceptance_length']:5.2f}  mean tree size "
              f"{r['mean_tree_size']:5.1f}  {'same tokens as ar' if r['same_as_ar'] else 'DIFFERS FROM ar'}")


def train_pair(args, argv, train_ids, held_ids, t_start: float) -> dict:
    """The whole recipe: target, its greedy corpus, drafter; writes target/, drafter/, train_info.json."""
    shape = dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                 num_kv_heads=max(1, args.hidden // 128), head_dim=64)
    target = train_target(train_ids, args.target_steps, seed=args.seed, **shape)
    # What ships is the bf16-rounded target: the drafter learns that model's greedy text.
    target = target.to(torch.bfloat16).to(torch.float32)
    losses = {"train": target_loss(target, train_ids), "held_out": target_loss(target, held_ids)}
    print(f"target loss (nats/char): train {losses['train']:.3f}, held-out {losses['held_out']:.3f}")
    t_target = time.perf_counter() - t_start

    seqs = greedy_corpus(target, train_ids, args.greedy_seqs, GREEDY_PROMPT, GREEDY_NEW, seed=args.seed + 1)
    drafter = new_drafter(target.config, args.block_size)
    drafter = train_drafter(target, drafter, seqs, GREEDY_PROMPT, args.drafter_steps, seed=args.seed + 2)

    args.out.mkdir(parents=True, exist_ok=True)
    # Shipped in bf16 (a few MB); loaded and run in fp32 on CPU, so "the target" is the bf16-rounded model.
    target.to(torch.bfloat16).save_pretrained(args.out / "target")
    char_tokenizer().save_pretrained(args.out / "target")
    drafter.to(torch.bfloat16).save_pretrained(args.out / "drafter")
    info = {**_record(args, argv, train_ids, held_ids),
            "target_loss": losses, "device": "cpu", "threads": torch.get_num_threads(),
            "seconds": {"target": round(t_target), "total": None}}
    info["acceptance_held_out"] = evaluate(args.out / "target", args.out / "drafter", held_ids)
    return info


def train_drafter_only(args, argv, train_ids, held_ids, t_start: float) -> dict:
    """A drafter for the trained target in ``args.target`` (left unchanged), on the greedy corpus the recipe
    makes from that target; writes the drafter and train_info.json into ``args.out``."""
    weights = args.target / "model.safetensors"
    digest = _sha256(weights)
    target = load_trained_target(args.target)
    seqs = greedy_corpus(target, train_ids, args.greedy_seqs, GREEDY_PROMPT, GREEDY_NEW, seed=args.seed + 1)
    t_corpus = time.perf_counter() - t_start
    torch.manual_seed(args.seed + 2)  # the recipe's drafter starts from the RNG its target training left
    drafter = new_drafter(target.config, args.block_size)
    drafter = train_drafter(target, drafter, seqs, GREEDY_PROMPT, args.drafter_steps, seed=args.seed + 2)
    t_drafter = time.perf_counter() - t_start - t_corpus

    args.out.mkdir(parents=True, exist_ok=True)
    drafter.to(torch.bfloat16).save_pretrained(args.out)
    if _sha256(weights) != digest:
        raise RuntimeError(f"{weights} changed while its drafter was trained")
    info = {**_record(args, argv, train_ids, held_ids),
            "target": {"folder": str(args.target), "model_sha256": digest, "unchanged": True},
            "drafter": {"block_size": args.block_size, "steps": args.drafter_steps, "greedy_seqs": args.greedy_seqs,
                        "target_layer_ids": drafter.target_layer_ids},
            "device": "cpu", "threads": torch.get_num_threads(),
            "seconds": {"greedy_corpus": round(t_corpus), "drafter": round(t_drafter), "total": None}}
    info["acceptance_held_out"] = evaluate(args.target, args.out, held_ids, budgets=(16, 64, 256))
    return info


def main(argv=None, parser_class=argparse.ArgumentParser) -> int:
    from transformers.utils import logging as hf_logging

    from .cli import HelpFormatter, nonnegative_int, positive_int

    ap = parser_class(prog="ddtree train", description="Train the tiny char-level target + DFlash drafter pair "
                      "on CPU (about 15 minutes with the defaults), or with --target only a drafter for a trained "
                      "target (about 5 minutes for block size 16).",
                      formatter_class=HelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder: writes target/, drafter/, train_info.json; with "
                    "--target it is the drafter folder (config.json, model.safetensors, train_info.json)")
    ap.add_argument("--target", type=Path, default=None, metavar="DIR",
                    help="train only a drafter for this trained target folder (e.g. the shipped one), which stays "
                         "unchanged; its greedy corpus is regenerated as the whole recipe makes it")
    ap.add_argument("--target-steps", type=positive_int, default=None,
                    help=f"optimizer steps for the target (default: {TARGET_DEFAULTS['target_steps']})")
    ap.add_argument("--drafter-steps", type=positive_int, default=1500, help="optimizer steps for the drafter")
    ap.add_argument("--greedy-seqs", type=positive_int, default=2048, help="greedy continuations the drafter learns from")
    ap.add_argument("--hidden", type=positive_int, default=None,
                    help=f"hidden size of both models, a multiple of 64 (default: {TARGET_DEFAULTS['hidden']})")
    ap.add_argument("--layers", type=positive_int, default=None,
                    help=f"target layers; the drafter has one (default: {TARGET_DEFAULTS['layers']})")
    ap.add_argument("--block-size", type=positive_int, default=8, help="drafter block: the root + block-size - 1 drafted tokens")
    ap.add_argument("--threads", type=nonnegative_int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=nonnegative_int, default=0, help="seed of data order and initialisation")
    args = ap.parse_args(argv)
    if args.target is not None:
        given = [k for k in TARGET_DEFAULTS if getattr(args, k) is not None]
        if given:
            ap.error(f"argument --{given[0].replace('_', '-')}: shapes or trains the target, so not with --target "
                     "(the given target is used unchanged)")
        if not (args.target / "config.json").is_file() or not (args.target / "model.safetensors").is_file():
            ap.error(f"argument --target: {args.target} has no config.json and model.safetensors (a `ddtree train` "
                     "target folder)")
    for k, v in TARGET_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.hidden % 64 or args.layers < 2 or args.block_size < 2:
        ap.error("--hidden must be a multiple of 64 (heads of 64), --layers and --block-size at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # this command's own progress lines are the output
    t_start = time.perf_counter()
    train_ids, held_ids = load_corpus()
    print(f"corpus: {train_ids.numel():,} train / {held_ids.numel():,} held-out characters "
          f"(Python {platform.python_version()} stdlib)")
    if args.target is None:
        info, wrote = train_pair(args, argv, train_ids, held_ids, t_start), "target/, drafter/ and train_info.json"
    else:
        info, wrote = train_drafter_only(args, argv, train_ids, held_ids, t_start), "the drafter and train_info.json"
    info["seconds"]["total"] = round(time.perf_counter() - t_start)
    (args.out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"\nwrote {wrote} to {args.out} in {info['seconds']['total']} s; greedy decoding of held-out prompts:")
    _print_acceptance(info["acceptance_held_out"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
