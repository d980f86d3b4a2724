"""The tiny character-level pair: its vocabulary, configs, tokenizer and random builders.

The shipped demo pair (trained by :mod:`ddtree.train`), ``ddtree demo --random`` and the tests all use
these. Random pairs are a stock ``transformers`` Qwen3/Llama with random weights and a random
:class:`~ddtree.drafter.DFlashDrafter` shaped for it; nothing is downloaded. With a random drafter the
acceptance length is about 1.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Optional

import torch

from .drafter import DFlashConfig, DFlashDrafter

SPECIALS = ["<unk>", "<eos>", "<mask>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
VOCAB_SIZE = len(SPECIALS) + len(CHARS)  # every id the model can produce is a character (or a special)
EOS_ID = SPECIALS.index("<eos>")
MASK_ID = SPECIALS.index("<mask>")


def target_config(arch: str = "qwen3", vocab_size: int = VOCAB_SIZE, hidden_size: int = 64, num_layers: int = 2,
                  num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16, init_std: float = 0.2, **extra):
    """A small Qwen3 or Llama config (untied LM head, ``init_std`` large enough that greedy argmaxes are
    clear-cut rather than near-ties of an almost uniform distribution)."""
    from transformers import LlamaConfig, Qwen3Config

    cls = {"qwen3": Qwen3Config, "llama": LlamaConfig}[arch]
    return cls(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, initializer_range=init_std,
        tie_word_embeddings=False, eos_token_id=EOS_ID, pad_token_id=0, **extra,
    )


def random_target(arch: str = "qwen3", seed: int = 0, dtype=torch.float32, **config_kw):
    """A randomly initialised ``transformers`` causal LM (eval mode, SDPA attention)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = target_config(arch, **config_kw)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def random_drafter(target_cfg, block_size: int = 4, num_layers: int = 1, target_layer_ids: Optional[list[int]] = None,
                   mask_token_id: int = MASK_ID, seed: int = 0, init_std: float = 0.2,
                   dtype=torch.float32) -> DFlashDrafter:
    """A random DFlash drafter shaped for ``target_cfg``, reading every target layer by default."""
    ids = list(target_layer_ids if target_layer_ids is not None else range(target_cfg.num_hidden_layers))
    model = DFlashDrafter(DFlashConfig.for_target(target_cfg, num_layers, block_size, mask_token_id, ids))
    gen = torch.Generator().manual_seed(seed)
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


def make_pair(folder: str | Path, arch: str = "qwen3", seed: int = 0, block_size: int = 4,
              **config_kw) -> tuple[Path, Path]:
    """Write a random target (with the character tokenizer) and a matching drafter under ``folder``;
    returns their two folders. ``config_kw`` go to :func:`target_config`."""
    folder = Path(folder)
    target = random_target(arch, seed=seed, **config_kw)
    drafter = random_drafter(target.config, block_size=block_size, seed=seed + 1)
    target.save_pretrained(folder / "target")
    char_tokenizer().save_pretrained(folder / "target")
    drafter.save_pretrained(folder / "drafter")
    return folder / "target", folder / "drafter"
