// CPU accept_tree: the longest root path the target agrees with, and the bonus token.
//
// Walk from the root (ops.h): at slot c move to the smallest slot j in (c, num_nodes] with
// parents[j] == c and tokens[j] == target_tokens[c]; stop when there is none or when accepted_slots
// (max_depth + 1 columns, N + 1 when max_depth < 0) is full. accept_len counts the root;
// next_token = target_tokens[last accepted slot]. A linear scan per step costs O(N * depth), which is
// nothing next to the target forward; the batch is split with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "check_cpu.h"
#include "ops.h"

namespace ddtree::cpu {

AcceptResult accept_tree(const at::Tensor& tokens_in, const at::Tensor& parents_in,
                         const at::Tensor& num_nodes_in, const at::Tensor& target_tokens_in,
                         int64_t max_depth) {
  const char* op = "accept_tree";
  check_accept_tree(tokens_in, parents_in, num_nodes_in, target_tokens_in, max_depth);
  check_cpu(op, "tokens", tokens_in);
  check_cpu(op, "parents", parents_in);
  check_cpu(op, "num_nodes", num_nodes_in);
  check_cpu(op, "target_tokens", target_tokens_in);
  const at::Tensor tokens = tokens_in.contiguous(), parents = parents_in.contiguous();
  const at::Tensor num_nodes = num_nodes_in.contiguous(), target_tokens = target_tokens_in.contiguous();

  const int64_t B = tokens.size(0), T = tokens.size(1), width = accept_width(T, max_depth);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int32_t* par = parents.data_ptr<int32_t>();
  const int32_t* nn = num_nodes.data_ptr<int32_t>();
  const int64_t* tgt = target_tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(nn[b] >= 0 && nn[b] <= T - 1, op, ": num_nodes[", b, "] = ", nn[b],
                " must be in [0, tokens.size(1) - 1] = [0, ", T - 1, "]");
    for (int64_t j = 1; j <= nn[b]; ++j) {
      const int32_t p = par[b * T + j];
      TORCH_CHECK(p >= 0 && p < j, op, ": parents[", b, ", ", j, "] = ", p,
                  " points to slot indices outside the tree: a node's parent must be in [0, ", j - 1, "]");
    }
  }

  at::Tensor accepted = at::full({B, width}, -1, tokens.options());
  at::Tensor accept_len = at::empty({B}, num_nodes.options());
  at::Tensor next_token = at::empty({B}, tokens.options());
  int64_t* acc = accepted.data_ptr<int64_t>();
  int32_t* len_out = accept_len.data_ptr<int32_t>();
  int64_t* next = next_token.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* tk = tok + b * T;
      const int32_t* pa = par + b * T;
      const int64_t* tg = tgt + b * T;
      int64_t c = 0, len = 1;
      acc[b * width] = 0;
      while (len < width) {
        int64_t child = -1;
        for (int64_t j = c + 1; j <= nn[b]; ++j) {
          if (pa[j] == c && tk[j] == tg[c]) {
            child = j;
            break;
          }
        }
        if (child < 0) break;
        acc[b * width + len++] = child;
        c = child;
      }
      len_out[b] = static_cast<int32_t>(len);
      next[b] = tg[c];
    }
  });
  return {accepted, accept_len, next_token};
}

}  // namespace ddtree::cpu
