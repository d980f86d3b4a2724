"""Tiny random targets and drafters for the decode-loop tests (hidden 64, 2 layers, small vocabularies).

The builders themselves live in :mod:`ddtree.tiny` (the demo uses the same pair); this module adds the
test-only pieces: Hugging Face greedy references and an "oracle-ish" drafter that knows the target's
future greedy tokens, so that long accepted paths and KV compaction get exercised.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ddtree import tiny

# Models this small only lose time to intra-op threads (and the test machine has 2 busy cores).
torch.set_num_threads(1)

tiny_target = tiny.random_target  # (arch="qwen3", seed=0, dtype=..., **config_kw) -> HF causal LM
tiny_drafter = tiny.random_drafter  # (target_config, block_size=4, ...) -> DFlashDrafter
save_pair = tiny.make_pair  # (folder, arch="qwen3", seed=0, block_size=4, **config_kw) -> (target dir, drafter dir)


@torch.no_grad()
def hf_greedy(model, prompt: Sequence[int], max_new_tokens: int, stop_token_ids: Sequence[int] = ()) -> list[int]:
    """transformers' own greedy decoding of one prompt: the reference every method must reproduce."""
    out = model.generate(
        torch.tensor([list(prompt)]), do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_token_ids) or None, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


class OracleDrafter:
    """Wraps a real drafter (which still runs, so its cache is exercised) and replaces its logits with
    guesses built from known continuations: at each depth the true next greedy token gets the largest
    logit with probability ``hit``, otherwise the second largest (so trees with ``K >= 2`` still find
    it and chains do not) -- and past the known continuation, noise.

    sequences[b] = prompt_b + the target's greedy continuation of it. Test-only: it reads context
    lengths on the host every round.
    """

    def __init__(self, drafter, sequences: Sequence[Sequence[int]], vocab_size: int, hit: float = 0.7, seed: int = 0):
        self.inner, self.sequences, self.V, self.hit = drafter, [list(s) for s in sequences], vocab_size, hit
        self.gen = torch.Generator().manual_seed(seed)
        self.block_size, self.target_layer_ids = drafter.block_size, drafter.target_layer_ids

    def reset(self, batch_size: int, max_len: int) -> None:
        self.inner.reset(batch_size, max_len)

    def draft(self, target, root_tokens, features, lengths):
        real = self.inner.draft(target, root_tokens, features, lengths)
        B, D, V = real.shape
        ctx = self.inner.context_lens.tolist()
        logits = torch.randn(B, D, V, generator=self.gen)
        for b in range(B):
            seq = self.sequences[b]
            for i in range(D):
                pos = ctx[b] + 1 + i  # the root sits at position ctx
                if pos >= len(seq):
                    break
                true = seq[pos]
                wrong = (true + 1 + int(torch.randint(V - 1, (1,), generator=self.gen))) % V
                top, second = (true, wrong) if torch.rand((), generator=self.gen) < self.hit else (wrong, true)
                logits[b, i, top], logits[b, i, second] = 10.0, 8.0
        return logits.to(real.device)
