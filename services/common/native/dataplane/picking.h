// How a model call picks its version and its replica: the same rules as the
// Python gateway's (services/common/native/protocol.py: pick_weighted,
// pick_two; tests/unit/test_native_constants.py compiles this header and
// checks that both choose alike). Header-only, no gRPC: the hot path inlines it.
#pragma once

#include <cstddef>
#include <vector>

namespace cloudml::dataplane {

// The traffic split: the first of `choices` (each with a `weight`) whose
// running sum of weights reaches `draw`, a uniform draw in [0, total
// weight); the last if none does (rounding).
template <typename Choice>
const Choice& PickWeighted(const std::vector<Choice>& choices, double draw) {
  const Choice* choice = &choices[0];
  for (const auto& c : choices) {
    choice = &c;
    if ((draw -= c.weight) <= 0) break;
  }
  return *choice;
}

// Power of two choices: of `candidates`, two different ones (`index(n)`
// draws a uniform index in [0, n)), the one with the least `load`, the first
// on a tie; nullptr without candidates.
template <typename T, typename Index, typename Load>
const T* PickTwo(const std::vector<const T*>& candidates, Index index, Load load) {
  if (candidates.empty()) return nullptr;
  if (candidates.size() == 1) return candidates[0];
  size_t n = candidates.size(), i = index(n), j = index(n);
  while (j == i) j = index(n);
  const T* a = candidates[i];
  const T* b = candidates[j];
  return load(*a) <= load(*b) ? a : b;
}

}  // namespace cloudml::dataplane
