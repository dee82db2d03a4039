// Kernel tiers. Each op is one source with a portable loop and, where the instruction set the library
// is compiled for (-march=<target.cpu>) allows, AVX2 and AVX-512 inner loops. The library built for a
// target holds exactly the tiers that target can execute, so an engine never carries an instruction its
// declared CPU lacks. At run time an op takes its best path at or below kernel_isa(): the best tier
// compiled in, lowered by set_isa_cap() (tests and the quality gate run every tier the host can execute).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLMBUILD_AVX2 1
#endif
#if defined(LLMBUILD_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define LLMBUILD_AVX512 1
#endif
#if defined(LLMBUILD_AVX2)
#include <immintrin.h>
#endif

namespace llmbuild {

enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The tier ops run now: the best one compiled in, capped by set_isa_cap.
Isa kernel_isa();

// Names of the tiers compiled into this library, best first ("avx512", "avx2", "portable").
std::vector<std::string> compiled_isas();

// Cap the tier every op uses ("avx512", "avx2" or "portable"); a tier above the compiled ones is an error.
void set_isa_cap(const std::string& name);

#if defined(LLMBUILD_AVX2)
// Sum of the 8 lanes.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// Accumulating dot products through inline asm: these instructions have a single form, whose accumulator is
// also a source, and GCC 12 allocates the intrinsics' tied accumulators badly inside unrolled register tiles (a
// register copy per product, and spills to the stack): W8A8 tiles built on the intrinsic ran at 0.5-0.6x the
// int8 ops per second of the same tiles on these (standalone test, 2 AMD EPYC cores: 1.0 against 1.6-1.9 TOPS).
#if defined(__AVX512VNNI__)
// acc += vpdpbusd(u, s): u8 x s8 products summed in groups of four into int32 lanes.
inline void dpbusd(__m512i& acc, __m512i u, __m512i s) { asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s)); }
#endif
#if defined(__AVX512BF16__)
// acc += vdpbf16ps(a, b): bf16 pairs multiplied and summed into fp32 lanes.
inline void dpbf16(__m512& acc, __m512i a, __m512i b) { asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b)); }
#endif

}  // namespace llmbuild
