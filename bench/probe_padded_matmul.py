"""Is a zero-padded reduction bit-exact on this CPU's BLAS? Why ``ddtree scale-target`` adds layers instead
of widening the target's MLP.

A wider Qwen3 (one MLP width for every layer) would run the shipped layers' ``down_proj`` over ``K0`` real
units plus ``K - K0`` units whose weight columns are zero. The sum is then the same numbers in another
order unless the BLAS happens to split the long reduction where it splits the short one. This prints, for
the shipped MLP width (256) and the attention width (128), which padded widths ``K`` and which placements
(offset of the real units) give ``torch.equal`` results for every row count ``M`` (1 = one token decoding,
larger = prefill, trees, batches), fp32, one thread.

    python3 bench/probe_padded_matmul.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS = (1, 2, 3, 4, 5, 8, 17, 64, 129, 257)


def exact(K0: int, K: int, M: int, offset: int, g: torch.Generator, N: int = 128) -> bool:
    x0, w0 = torch.randn(M, K0, generator=g), torch.randn(N, K0, generator=g)
    x, w = torch.randn(M, K, generator=g), torch.zeros(N, K)  # extra activations are real numbers, weights 0
    x[:, offset:offset + K0], w[:, offset:offset + K0] = x0, w0
    return torch.equal(F.linear(x0, w0), F.linear(x, w))


def main():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(torch.__config__.show().splitlines()[3].strip(), "|", torch.backends.cpu.get_cpu_capability())
    for K0 in (128, 256):
        widths = [K for K in range(K0 + 1, 4097) if K % 64 == 0 or K == K0 + 1] + [53504]
        ok = [K for K in widths if all(exact(K0, K, M, 0, g) for M in ROWS)]
        print(f"K0={K0}, real units first: exact for every M at K in {ok if len(ok) < 12 else f'{len(ok)} of {len(widths)}'}")
        for M in (1, 4, 64):
            offsets = [o for o in range(0, 1025, 32) if exact(K0, 2048, M, o, g)]
            print(f"  K=2048, M={M}: exact at offsets {offsets if len(offsets) < 12 else f'{len(offsets)} of 33'}")


if __name__ == "__main__":
    main()
