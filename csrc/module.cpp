// The thin Python module: build facts only. The ops themselves are registered with the dispatcher in
// torch_bindings.cpp and are reached through torch.ops.ddtree.*.
#include <pybind11/pybind11.h>

#ifndef DDTREE_VERSION
#define DDTREE_VERSION "0.0.0"
#endif
#ifndef DDTREE_TORCH_VERSION
#define DDTREE_TORCH_VERSION ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddtree build information; the ops live in torch.ops.ddtree";
  m.attr("__version__") = DDTREE_VERSION;
  m.attr("torch_version") = DDTREE_TORCH_VERSION;  // torch.__version__ at build time: the ABI this binds to
#ifdef DDTREE_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = DDTREE_CUDA_ARCHS;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
}
