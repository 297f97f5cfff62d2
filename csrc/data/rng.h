// The integer RNG shared with the Python reference (bert_fast/data/rng.py): a splitmix64 stream
// keyed by (seed, epoch, index, domain), so every document and every sample has its own stream and
// the output does not depend on thread count or rank layout. Keep the two files in step.
#pragma once

#include <cstdint>

namespace bert_fast_data {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kDomainPlan = 0x504C414EULL;  // "PLAN"
constexpr uint64_t kDomainMask = 0x4D41534BULL;  // "MASK"

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline uint64_t stream_key(uint64_t seed, uint64_t epoch, uint64_t index, uint64_t domain) {
  uint64_t h = mix64(seed ^ domain);
  h = mix64(h ^ epoch);
  return mix64(h ^ index);
}

class Rng {
 public:
  Rng(uint64_t seed, uint64_t epoch, uint64_t index, uint64_t domain)
      : state_(stream_key(seed, epoch, index, domain)) {}

  uint64_t next_u64() {
    state_ += kGolden;
    return mix64(state_);
  }
  // Uniform in [0, n) by multiply-high (Lemire).
  uint64_t below(uint64_t n) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(next_u64()) * n) >> 64);
  }
  // Uniform in [low, high], both included.
  int64_t randint(int64_t low, int64_t high) {
    return low + static_cast<int64_t>(below(static_cast<uint64_t>(high - low + 1)));
  }
  // Uniform in [0, 1) with 53 random bits.
  double random() { return static_cast<double>(next_u64() >> 11) * (1.0 / 9007199254740992.0); }

 private:
  uint64_t state_;
};

}  // namespace bert_fast_data
