// Shared bits of the emulated-kernel tests: a seeded generator, a mismatch counter that prints the
// first few mismatches with their case, and the summary line. Include after cuemu.h and the kernel.
#pragma once

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>

namespace emu_test {

// uniform integer in [lo, hi]
struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  int64_t operator()(int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(gen() % static_cast<uint64_t>(hi - lo + 1));
  }
  bool coin(int one_in) { return gen() % static_cast<uint64_t>(one_in) == 0; }
  double uniform() { return std::uniform_real_distribution<double>(0.0, 1.0)(gen); }
  float normal(float sigma) { return std::normal_distribution<float>(0.f, sigma)(gen); }
};

inline std::string fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// Counts cases and mismatching cases; prints the first few mismatches.
struct Tally {
  const char* op;
  long cases = 0, bad = 0;
  explicit Tally(const char* name) : op(name) {}
  // one case checked: `why` empty means it matched
  void record(const std::string& what, const std::string& why) {
    ++cases;
    if (why.empty()) return;
    if (bad < 5) std::printf("  MISMATCH %s: %s\n", what.c_str(), why.c_str());
    ++bad;
  }
  int finish(const std::string& detail) const {
    std::printf("%s: %ld cases, %ld mismatches%s%s\n", op, cases, bad, detail.empty() ? "" : "; ", detail.c_str());
    return bad != 0 ? 1 : 0;
  }
};

}  // namespace emu_test
