"""The target forward's tree verification, as the runner hands it to the attention backend.

The runner (:mod:`ddtree.vllm.runner`) builds one :class:`TreeCall` per step that verifies trees, with
tensor ops, and sets it around the target's attention-metadata build only (:func:`set_tree_call`); the
drafter's metadata never sees it. The backend (:mod:`ddtree.vllm.cpu_attention` on CPU,
:mod:`ddtree.vllm.attention` on CUDA) adds the call's block table for its KV cache group.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch


@dataclass
class TreeCall:
    """One tree attention call over the ``M`` requests of a step whose query fits ``T`` slots (trees,
    plain decodes, short prompt chunks as chains), padded to ``T`` slots."""

    members: torch.Tensor  # [M] i64: the requests (batch indices) in the call
    members_np: np.ndarray  # the same on the host
    slots: torch.Tensor  # [M, T] i64: flat query row of (request, slot), -1 for padding
    gather: torch.Tensor  # [M * T] i64: the same with padding at row 0
    rows: torch.Tensor  # [R] i64: the flat query rows the call computes (its real slots)
    picks: torch.Tensor  # [R] i64: where those rows are in the call's [M * T] output
    context_lens: torch.Tensor  # [M] i64
    tree_mask: torch.Tensor  # [M, T, ceil(T / 32)] i32
    num_nodes: torch.Tensor  # [M] i32: query rows - 1
    max_len: int  # max over the call of context + T
    others: bool  # some request of the step is not in the call (a long prompt chunk)
    dense: bool = False  # the call's rows are the step's first M * T query rows, in order, no padding
    block_table: Optional[torch.Tensor] = None  # [M, blocks] i32 covering context + T, set per group

    def with_block_table(self, block_table: torch.Tensor, block_size: int) -> "TreeCall":
        """This call with its requests' rows of a group's block table, widened to cover context + T
        (the entries past a request's own blocks are never read: any block id)."""
        need = (self.max_len + block_size - 1) // block_size
        table = block_table[self.members][:, :need].to(torch.int32)
        if table.shape[1] < need:
            table = torch.cat([table, table.new_zeros(table.shape[0], need - table.shape[1])], dim=1)
        return replace(self, block_table=table.contiguous())


_verify = threading.local()


def set_tree_call(call: Optional[TreeCall]) -> None:
    """The tree call of the next target forward (None clears it)."""
    _verify.call = call


def tree_call() -> Optional[TreeCall]:
    return getattr(_verify, "call", None)
