// Run-time choice of the instruction set of the C++ CPU kernels, shared by plif_cpu.cpp and
// spikgru2plus_cpu.cpp: on x86-64 with GCC or Clang their task functions are compiled twice, for
// the baseline ISA and for AVX2 (8 float lanes instead of SSE2's 4), and the AVX2 copy runs where
// use_avx2() says so. No FMA in either copy: the arithmetic must round like the reference's.
#pragma once

#include <ATen/Version.h>

#include <string>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define NEUROKERN_HAVE_AVX2_TARGET 1
#endif

namespace neurokern {

// Whether to run the AVX2 copies: the CPU has AVX2 and torch's ATEN_CPU_CAPABILITY does not ask
// for less (ATEN_CPU_CAPABILITY=default selects the baseline copies, as for torch's own kernels).
inline bool use_avx2() {
#ifdef NEUROKERN_HAVE_AVX2_TARGET
  static const bool value = [] {
    const std::string capability = at::get_cpu_capability();
    return __builtin_cpu_supports("avx2") && (capability == "AVX2" || capability == "AVX512");
  }();
  return value;
#else
  return false;
#endif
}

}  // namespace neurokern
