// Device check shared by the CPU kernels: validate.cpp checks that the arguments of an op share one
// device; these kernels additionally need that device to be the CPU, and say which argument is not.
#pragma once

#include <ATen/core/Tensor.h>

namespace ddtree::cpu {

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
}

}  // namespace ddtree::cpu
