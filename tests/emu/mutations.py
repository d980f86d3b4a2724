"""Do the emulated-kernel tests have teeth? Applies one deliberate bug at a time to a copy of the kernel
headers, runs that op's emulated test on the copy (scripts/emu_check.sh with EMU_CSRC) and reports
whether it failed, with the first line that says why. Not part of CI (a few minutes per mutation on 2
cores); the results are recorded in bench/RESULTS.md.

    python3 tests/emu/mutations.py [--only SUBSTRING ...] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutation:
    name: str  # short id
    kind: str  # what kind of bug
    op: str  # the emulated test that must catch it
    file: str  # relative to csrc/cuda
    old: str  # text to replace (must occur exactly once)
    new: str


M = Mutation
MUTATIONS = [
    # a dropped __syncthreads
    M("bt-sync-stage", "dropped __syncthreads", "build_tree", "build_tree_kernel.cuh",
      "  }\n  __syncthreads();\n\n  if (threadIdx.x == 0) {", "  }\n\n  if (threadIdx.x == 0) {"),
    M("bt-sync-mask", "dropped __syncthreads", "build_tree", "build_tree_kernel.cuh",
      "mask_b[i] = 0;\n  __syncthreads();", "mask_b[i] = 0;"),
    M("bt-sync-size", "dropped __syncthreads", "build_tree", "build_tree_kernel.cuh",
      "      s_phi = phi;\n    }\n  }\n  __syncthreads();\n", "      s_phi = phi;\n    }\n  }\n"),
    M("topk-sync-bitonic-end", "dropped __syncthreads", "topk_marginals", "topk_marginals_kernel.cuh",
      "    }\n  }\n  __syncthreads();\n\n  const float m = s_max;", "    }\n  }\n\n  const float m = s_max;"),
    M("radix-sync-hist", "dropped __syncthreads", "topk_marginals", "tree_common.cuh",
      "sh.hist[i] = 0;\n    __syncthreads();", "sh.hist[i] = 0;"),
    M("attn-sync-v", "dropped __syncthreads", "tree_attention", "tree_attention_kernel.cuh",
      "    __syncthreads();  // V(it) landed; every warp is done reading sK\n", ""),
    M("attn-sync-k", "dropped __syncthreads", "tree_attention", "tree_attention_kernel.cuh",
      "    __syncthreads();  // K(it+1) landed; every warp is done reading sV\n", ""),
    M("ckv-sync-read", "dropped __syncthreads", "compact_kv", "compact_kv_kernel.cuh",
      "    __syncthreads();  // every read of this chunk before any of its writes\n", ""),
    # an off-by-one bound
    M("accept-scan-end", "off-by-one bound", "accept_tree", "accept_tree_kernel.cuh",
      "const bool match = j <= n &&", "const bool match = j < n &&"),
    M("topk-row-end", "off-by-one bound", "topk_marginals", "topk_marginals_kernel.cuh",
      "key32[j * VEC + e] = li0 + e < n_valid ?", "key32[j * VEC + e] = li0 + e <= n_valid ?"),
    M("bt-child-depth", "off-by-one bound", "build_tree", "build_tree_kernel.cuh",
      "const bool has_child = depth < D;", "const bool has_child = depth <= D;"),
    M("attn-chunk-end", "off-by-one bound", "tree_attention", "tree_attention_kernel.cuh",
      "            if (pos >= ke) {", "            if (pos > ke) {"),
    M("ckv-row-bound", "off-by-one bound", "compact_kv", "compact_kv_kernel.cuh",
      "off >= c.S - ctx ? nullptr", "off > c.S - ctx ? nullptr"),
    M("ckv-write-src-check", "dropped bounds check", "compact_kv", "compact_kv_kernel.cuh",
      "if (s != i && dst != nullptr && row_at(s) != nullptr) {", "if (s != i && dst != nullptr) {"),
    # a shuffle to the wrong lane
    M("topk-pos-lane", "shuffle to the wrong lane", "topk_marginals", "topk_marginals_kernel.cuh",
      "&out_count, __popc(ballot));\n      pos0 = __shfl_sync(kFullMask, pos0, 0);",
      "&out_count, __popc(ballot));\n      pos0 = __shfl_sync(kFullMask, pos0, 1);"),
    M("topk-posinf-xor", "shuffle to the wrong lane", "topk_marginals", "topk_marginals_kernel.cuh",
      "n_posinf += __shfl_xor_sync(kFullMask, n_posinf, off);",
      "n_posinf += __shfl_xor_sync(kFullMask, n_posinf, off >> 1);"),
    M("attn-rowmax-lane", "shuffle to the wrong lane", "tree_attention", "tree_attention_kernel.cuh",
      "mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));", "mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));"),
    M("attn-rowsum-lane", "shuffle to the wrong lane", "tree_attention", "tree_attention_kernel.cuh",
      "l_run[hr] += __shfl_xor_sync(0xffffffffu, l_run[hr], 2);",
      "l_run[hr] += __shfl_xor_sync(0xffffffffu, l_run[hr], 4);"),
    M("radix-suffix-lane", "shuffle to the wrong lane", "topk_marginals", "tree_common.cuh",
      "__shfl_down_sync(kFullMask, suffix, off);", "__shfl_up_sync(kFullMask, suffix, off);"),
    # a negated ballot
    M("accept-ballot", "negated ballot", "accept_tree", "accept_tree_kernel.cuh",
      "__ballot_sync(0xffffffffu, match)", "__ballot_sync(0xffffffffu, !match)"),
    M("topk-sel-ballot", "negated ballot", "topk_marginals", "topk_marginals_kernel.cuh",
      "__ballot_sync(kFullMask, sel)", "__ballot_sync(kFullMask, !sel)"),
    M("radix-match-ballot", "negated ballot", "topk_marginals", "tree_common.cuh",
      "__ballot_sync(kFullMask, match)", "__ballot_sync(kFullMask, !match)"),
    # a flipped comparison
    M("bt-score-order", "flipped comparison", "build_tree", "build_tree_kernel.cuh",
      "if (a.score != b.score) return a.score > b.score;", "if (a.score != b.score) return a.score < b.score;"),
    M("bt-cost-argmax", "flipped comparison", "build_tree", "build_tree_kernel.cuh",
      "if (theta > best_theta) {", "if (theta >= best_theta) {"),
    M("bt-cost-first-stop", "old rule (first stop of growth)", "build_tree", "build_tree_kernel.cuh",
      "if (theta > best_theta) {", "if (!(theta > best_theta)) break;\n        {"),
    M("bt-batch-argmax", "flipped comparison", "build_tree", "../budget_rule.h",
      "    if (theta > best_theta) {\n      best_theta = theta;\n      best = n + 1;",
      "    if (theta >= best_theta) {\n      best_theta = theta;\n      best = n + 1;"),
    M("bt-ragged-argmax", "flipped comparison", "build_tree", "../budget_rule.h",
      "        if (theta > best_theta) {\n          best_theta = theta;\n          best_t = t + 1;",
      "        if (theta >= best_theta) {\n          best_theta = theta;\n          best_t = t + 1;"),
    M("topk-bitonic-dir", "flipped comparison", "topk_marginals", "topk_marginals_kernel.cuh",
      "if ((a < b) == desc && a != b) {", "if ((a > b) == desc && a != b) {"),
    M("attn-combine-skip", "flipped comparison", "tree_attention", "tree_attention_kernel.cuh",
      "      if (m == -INFINITY) continue;", "      if (m != -INFINITY) continue;"),
    M("ckv-ctx-check", "flipped comparison", "compact_kv", "compact_kv_kernel.cuh",
      "if (ctx < 0 || ctx >= c.S) return;", "if (ctx < 0 || ctx > c.S) return;"),
    M("ckv-len-clamp", "flipped comparison", "compact_kv", "compact_kv_kernel.cuh",
      "a = a < 0 ? 0 : (a > batch.width ? batch.width : a);", "a = a < 0 ? 0 : (a < batch.width ? batch.width : a);"),
    M("accept-clamp", "flipped comparison", "accept_tree", "accept_tree_kernel.cuh",
      "const int n = nn_raw < 0 ? 0 :", "const int n = nn_raw > 0 ? 0 :"),
    # the tensor-core and async-copy paths
    M("attn-mma-b-swap", "swapped mma operand registers", "tree_attention", "tree_attention_kernel.cuh",
      "mma_16816<T>(s[2 * n2], qf[kd], kf[0], kf[1]);", "mma_16816<T>(s[2 * n2], qf[kd], kf[1], kf[0]);"),
    M("attn-ldmatrix-trans", "ldmatrix without .trans", "tree_attention", "tree_attention_kernel.cuh",
      "ldmatrix_x4_trans(vf,", "ldmatrix_x4(vf,"),
    M("attn-wait-q", "dropped cp.async wait", "tree_attention", "tree_attention_kernel.cuh",
      "  cp_async_commit();\n  cp_async_wait_all();\n  __syncthreads();", "  cp_async_commit();\n  __syncthreads();"),
    M("attn-commit-v", "dropped cp.async commit", "tree_attention", "tree_attention_kernel.cuh",
      "    load_kv_tile<T, D>(sV, vc, v_rows, b, h, k0, ke);\n    cp_async_commit();",
      "    load_kv_tile<T, D>(sV, vc, v_rows, b, h, k0, ke);"),
    # the paged ops' block-table addressing
    M("pckv-span-bound", "off-by-one bound", "paged_compact_kv", "paged_compact_kv_kernel.cuh",
      "if (off < 0 || off >= span - ctx) return nullptr;", "if (off < 0 || off > span - ctx) return nullptr;"),
    M("pckv-block-check", "flipped comparison", "paged_compact_kv", "paged_compact_kv_kernel.cuh",
      "if (block < 0 || block >= c.num_blocks) return nullptr;",
      "if (block < 0 || block > c.num_blocks) return nullptr;"),
    M("pckv-table-bypass", "block table bypassed", "paged_compact_kv", "paged_compact_kv_kernel.cuh",
      "return c.base + block * c.s_block", "return c.base + (pos / batch.block_size) * c.s_block"),
    M("pattn-block-clamp", "off-by-one bound", "paged_tree_attention", "paged_tree_attention_kernel.cuh",
      "(block >= num_blocks ? num_blocks - 1 : block)", "(block > num_blocks ? num_blocks - 1 : block)"),
    M("pattn-table-bypass", "block table bypassed", "paged_tree_attention", "paged_tree_attention_kernel.cuh",
      "return block * s_block + (pos % block_size)", "return (pos / block_size) * s_block + (pos % block_size)"),
    # synchronisation the emulator must report by block and thread
    M("topk-divergent-barrier", "__syncthreads in a branch", "topk_marginals", "topk_marginals_kernel.cuh",
      "      s_posinf = cnt;", "      s_posinf = cnt;\n      __syncthreads();"),
    M("radix-partial-mask", "collective naming lanes that never arrive", "topk_marginals", "tree_common.cuh",
      "__match_any_sync(ballot, digit)", "__match_any_sync(ballot | (ballot << 1), digit)"),
]


def run(m: Mutation, workdir: Path) -> tuple[bool, str, float]:
    """Applies m to a copy of csrc, runs its op's emulated test; returns (caught, evidence, seconds)."""
    csrc = workdir / "csrc"
    if csrc.exists():
        shutil.rmtree(csrc)
    shutil.copytree(ROOT / "csrc", csrc)
    path = csrc / "cuda" / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutation {m.name}: the text to replace occurs {text.count(m.old)} times in {m.file}")
    path.write_text(text.replace(m.old, m.new))
    env = dict(os.environ, EMU_CSRC=str(csrc), EMU_BUILD_DIR=str(workdir / "build"), EMU_FAIL_FAST="1")
    t0 = time.time()
    proc = subprocess.run(["bash", str(ROOT / "scripts/emu_check.sh"), m.op], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    secs = time.time() - t0
    out = proc.stdout + proc.stderr
    if re.search(r"FAIL \S+: build", out):
        raise SystemExit(f"mutation {m.name} does not compile:\n{out[-3000:]}")
    caught = proc.returncode != 0
    evidence = ""
    if caught:
        sched = re.search(r"FAIL \S+ \((schedule \S+), exit status (\d+)\)", out)
        why = next((ln.strip() for ln in out.splitlines()
                    if ln.strip().startswith(("MISMATCH", "cuemu:", "==", "FAIL", "timed out"))
                    or "runtime error" in ln), "")
        evidence = f"{sched.group(1) if sched else '?'}: {why}"
    return caught, evidence, secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=[], help="run the mutations whose name contains one of these")
    ap.add_argument("--markdown", action="store_true", help="print the results as a markdown table")
    args = ap.parse_args()
    todo = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="emu-mutations-") as tmp:
        for m in todo:
            caught, evidence, secs = run(m, Path(tmp))
            rows.append((m, caught, evidence, secs))
            print(f"{'caught' if caught else 'MISSED'} {m.name} ({m.kind}, {m.op}) {secs:.0f}s: {evidence[:220]}",
                  flush=True)
    if args.markdown:
        print("\n| mutation | kind | file | test | caught | first failure |")
        print("|---|---|---|---|---|---|")
        for m, caught, evidence, _ in rows:
            ev = evidence.replace("|", "\\|")[:200]
            print(f"| `{m.name}` | {m.kind} | {m.file} | {m.op} | {'yes' if caught else '**no**'} | {ev} |")
    missed = sum(1 for _, caught, _, _ in rows if not caught)
    print(f"{len(rows) - missed} of {len(rows)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
