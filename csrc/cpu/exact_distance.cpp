// Out-of-line entry points of exact_distance.h, compiled per ISA, for callers that are not vector
// clones themselves: the backward kernels' per-pair a.p and |a|^2, the prototypes' exact norms
// and nearest_prototypes' recompute of a row's shortlist. Inlined there, the helpers ran in the
// baseline x86-64 build, their 256-bit vectors split into SSE halves and spilled to the stack
// (perf, cosine top-4 backward at B 16, M 2000, D 128: that pass 2x the gradient gather). The
// vectors are 256-bit and no product is contracted into an FMA in any clone, so every clone
// returns the inlined helpers' bits.
#include "cpu/exact_distance.h"

namespace protokern::cpu {

template <typename acc_t>
PK_VECTOR_CLONES double dispatched_exact_dot(const acc_t* a, const acc_t* p, int64_t size,
                                             double* a_squared) {
  return exact_dot(a, p, size, a_squared);
}

template <typename acc_t>
PK_VECTOR_CLONES double dispatched_exact_distance(const acc_t* a, const acc_t* p, int64_t size,
                                                  Metric metric, double p_squared,
                                                  bool trusted) {
  return exact_distance(a, p, size, metric, p_squared, trusted);
}

#define PK_INSTANTIATE(acc_t)                                                                 \
  template double dispatched_exact_dot<acc_t>(const acc_t*, const acc_t*, int64_t, double*);  \
  template double dispatched_exact_distance<acc_t>(const acc_t*, const acc_t*, int64_t,       \
                                                   Metric, double, bool);

PK_INSTANTIATE(float)
PK_INSTANTIATE(double)

}  // namespace protokern::cpu
