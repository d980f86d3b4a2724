"""``ddtree demo`` and the tiny pairs behind it and the tests; nothing is downloaded.

The default pair ships in the package (``pretrained/stdlib-char``): a character-level Qwen3 target and
its DFlash drafter, trained here on the Python standard library's source by :mod:`ddtree.train`. The
random builders below (a stock ``transformers`` Qwen3/Llama with random weights, a random
:class:`~ddtree.drafter.DFlashDrafter`, a character-level tokenizer built with ``tokenizers``) serve the
tests and ``ddtree demo --random``; with a random drafter the acceptance length is about 1.
"""
from __future__ import annotations

import math
import string
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from .drafter import DFlashConfig, DFlashDrafter

SPECIALS = ["<unk>", "<eos>", "<mask>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
DEMO_VOCAB = len(SPECIALS) + len(CHARS)  # every id the model can produce is a character (or a special)


def target_config(arch: str = "qwen3", vocab_size: int = DEMO_VOCAB, hidden_size: int = 64, num_layers: int = 2,
                  num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16, init_std: float = 0.2, **extra):
    """A small Qwen3 or Llama config (untied LM head, ``init_std`` large enough that greedy argmaxes are
    clear-cut rather than near-ties of an almost uniform distribution)."""
    from transformers import LlamaConfig, Qwen3Config

    cls = {"qwen3": Qwen3Config, "llama": LlamaConfig}[arch]
    return cls(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, initializer_range=init_std,
        tie_word_embeddings=False, eos_token_id=SPECIALS.index("<eos>"), pad_token_id=0, **extra,
    )


def random_target(arch: str = "qwen3", seed: int = 0, dtype=torch.float32, **config_kw):
    """A randomly initialised ``transformers`` causal LM (eval mode, SDPA attention)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = target_config(arch, **config_kw)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def random_drafter(target_cfg, block_size: int = 4, num_layers: int = 1, target_layer_ids: Optional[list[int]] = None,
                   mask_token_id: int = SPECIALS.index("<mask>"), seed: int = 0, init_std: float = 0.2,
                   dtype=torch.float32) -> DFlashDrafter:
    """A random DFlash drafter shaped for ``target_cfg`` (same hidden size, head layout and vocabulary)."""
    L = target_cfg.num_hidden_layers
    cfg = DFlashConfig(
        hidden_size=target_cfg.hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=target_cfg.num_attention_heads, num_key_value_heads=target_cfg.num_key_value_heads,
        head_dim=target_cfg.head_dim, intermediate_size=target_cfg.intermediate_size,
        vocab_size=target_cfg.vocab_size, block_size=block_size, num_target_layers=L,
        target_layer_ids=list(target_layer_ids if target_layer_ids is not None else range(L)),
        mask_token_id=mask_token_id, rms_norm_eps=target_cfg.rms_norm_eps,
    )
    gen = torch.Generator().manual_seed(seed)
    model = DFlashDrafter(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight") or name == "fc.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
    return model.to(dtype).eval()


def char_tokenizer():
    """A character-level tokenizer over printable ASCII plus ``<unk>``, ``<eos>``, ``<mask>`` (built offline)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", mask_token="<mask>")


PRETRAINED = Path(__file__).resolve().parent / "pretrained" / "stdlib-char"  # target/, drafter/, train_info.json
DEMO_PROMPT = "    def __init__(self, "


def pretrained_pair() -> tuple[Path, Path]:
    """The shipped trained pair's (target folder, drafter folder)."""
    if not (PRETRAINED / "target" / "config.json").is_file():
        raise FileNotFoundError(f"the trained demo pair is missing from this install ({PRETRAINED}); "
                                "train it with `ddtree train --out DIR` or use `ddtree demo --random`")
    return PRETRAINED / "target", PRETRAINED / "drafter"


def make_pair(folder: str | Path, arch: str = "qwen3", seed: int = 0, block_size: int = 8,
              **config_kw) -> tuple[Path, Path]:
    """Write a random target (with tokenizer) and drafter under ``folder``; returns their two folders.
    ``config_kw`` go to :func:`target_config`."""
    folder = Path(folder)
    target = random_target(arch, seed=seed, **config_kw)
    drafter = random_drafter(target.config, block_size=block_size, seed=seed + 1)
    target.save_pretrained(folder / "target")
    char_tokenizer().save_pretrained(folder / "target")
    drafter.save_pretrained(folder / "drafter")
    return folder / "target", folder / "drafter"


def format_tree(tree, tokenizer=None, row: int = 0) -> str:
    """An indented rendering of one request's draft tree: token, conditional probability, path probability.

    Host-side and for display only (it loops over the tree's nodes, which the decode loop never does).
    """
    n = int(tree.num_nodes[row])
    tokens, parents = tree.tokens[row].tolist(), tree.parents[row].tolist()
    scores = tree.scores[row].tolist()
    children: dict[int, list[int]] = {}
    for s in range(1, n + 1):
        children.setdefault(parents[s], []).append(s)
    show = (lambda t: repr(tokenizer.convert_ids_to_tokens(t))) if tokenizer is not None else str
    lines = [f"root {show(tokens[0])}"]

    def walk(slot: int, indent: int) -> None:
        for c in children.get(slot, []):
            cond = math.exp(scores[c] - (scores[slot] if slot else 0.0))
            lines.append(f"{'  ' * indent}{show(tokens[c])}  p={cond:.3f}  path={math.exp(scores[c]):.3f}")
            walk(c, indent + 1)

    walk(0, 1)
    return "\n".join(lines)


def run(prompt: str = DEMO_PROMPT, max_new_tokens: int = 96, max_nodes: int = 64, seed: int = 0,
        device: str = "cpu", random: bool = False, threads: Optional[int] = 1, out=print) -> dict:
    """Run every method on ``prompt`` with the shipped trained pair (or a random one) and print what happened.
    ``threads``: torch's CPU threads on CPU (None: torch's default)."""
    import contextlib

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from . import decode, ops
    from .target import load_target

    hf_logging.disable_progress_bar()
    dev = torch.device(device)
    if dev.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)  # 1 by default: a model this small only loses time to thread hand-offs
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    results = {}
    with contextlib.ExitStack() as stack:
        if random:
            out("ddtree demo: a tiny RANDOMLY initialised target and drafter (built here, nothing downloaded).")
            out("The drafter's guesses are random, so expect an acceptance length of about 1 and gibberish text.")
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="ddtree-demo-"))
            tdir, ddir = make_pair(tmp, seed=seed, head_dim=64)  # 64: a head size the CUDA kernels take
        else:
            tdir, ddir = pretrained_pair()
            out("ddtree demo: the tiny pair shipped with ddtree (a character-level Qwen3 target and its DFlash")
            out("drafter, trained offline on the Python standard library by `ddtree train`; nothing downloaded).")
        tok = AutoTokenizer.from_pretrained(tdir)
        target = load_target(tdir, device=dev, dtype=dtype)
        drafter = DFlashDrafter.from_pretrained(ddir, device=dev, dtype=target.dtype)
        ids = tok(prompt).input_ids
        cost = decode.default_cost_model(target)
        out(f"device {dev}, {target.dtype}; prompt {prompt!r}; up to {max_new_tokens} new tokens; "
            f"DDTree budget and CaDDTree cap {max_nodes} nodes\n")
        for method in decode.METHODS:
            if dev.type == "cuda":  # warm-up at the same cache size: allocations, CUDA graphs, cost tables
                decode.generate(target, drafter, [ids], method=method, max_new_tokens=max_new_tokens,
                                max_nodes=max_nodes, cost_model=cost, seed=seed)
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = decode.generate(target, drafter, [ids], method=method, max_new_tokens=max_new_tokens,
                                  max_nodes=max_nodes, cost_model=cost, seed=seed)
            dt = time.perf_counter() - t0
            results[method] = res
            same = "" if method == "ar" else (
                "  (same tokens as ar)" if res.tokens == results["ar"].tokens else "  (DIFFERS FROM ar!)")
            out(f"[{method:8s}] acceptance length {res.acceptance_length:5.2f}  mean tree size "
                f"{res.mean_tree_size:5.1f}  {len(res.tokens[0]) / dt:7.1f} tokens/s{same}")
        same_all = all(r.tokens == results["ar"].tokens for r in results.values())
        out("\ngenerated (greedy; " + ("identical for every method):" if same_all else "ar's output):"))
        out(prompt + tok.decode(results["ar"].tokens[0]))

        # One draft tree, rendered: the DDTree a round would verify right after the prompt.
        target.set_feature_layers(drafter.target_layer_ids)
        cap = len(ids) + drafter.block_size + max_nodes + 2
        target.reset(1, cap)
        drafter.reset(1, cap)
        prompt_ids = torch.tensor([ids], device=target.device)
        lengths = torch.tensor([len(ids)], device=target.device)
        logits, feats = target.prefill(prompt_ids, lengths)
        x = logits.argmax(-1)
        dl = drafter.draft(target, x, feats, lengths)
        lp, tid = ops.topk_marginals(dl, min(4, dl.shape[-1]))
        tree = ops.build_tree(lp, tid, x, target.context_lens, 12)
        out("\nthe first round's draft tree (DDTree, 12 nodes, top-4 per depth): token, p(token | parent), "
            "path probability")
        out(format_tree(tree.to("cpu"), tok))
    return results
