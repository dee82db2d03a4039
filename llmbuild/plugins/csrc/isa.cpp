// The tier selection of isa.h: a process-wide cap, read once per op call.
#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace llmbuild {
namespace {

constexpr const char* kNames[] = {"portable", "avx2", "avx512"};

constexpr Isa kCompiled =
#if defined(LLMBUILD_AVX512)
    Isa::kAvx512;
#elif defined(LLMBUILD_AVX2)
    Isa::kAvx2;
#else
    Isa::kPortable;
#endif

std::atomic<int> cap{static_cast<int>(kCompiled)};

}  // namespace

Isa kernel_isa() { return static_cast<Isa>(cap.load(std::memory_order_relaxed)); }

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (int i = static_cast<int>(kCompiled); i >= 0; --i) names.emplace_back(kNames[i]);
  return names;
}

void set_isa_cap(const std::string& name) {
  for (int i = 0; i <= static_cast<int>(kCompiled); ++i) {
    if (name == kNames[i]) {
      cap.store(i, std::memory_order_relaxed);
      return;
    }
  }
  TORCH_CHECK(false, "llmbuild op library: kernel tier '", name, "' is not compiled in (have ", kNames[static_cast<int>(kCompiled)],
              " and below)");
}

}  // namespace llmbuild
