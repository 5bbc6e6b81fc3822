// Large output and scratch tensors of the CPU kernels backed by transparent huge pages.
//
// Why: a fresh (B, M) output is a fresh mapping (glibc serves requests past 32 MiB with mmap and
// unmaps them on free), so every call pays a page fault per 4 KiB on first touch. On the 2-core
// hosts this project runs on, touching 41 MB that way took 11-14 ms (3-4 GB/s), and at the
// cil_vectors shape (1024 x 10000) the forward's values and int64 indices, 123 MB, cost about 40
// ms of a 100 ms call; with 2 MiB pages the same touch takes 3-5 ms (benchmarks/NOTES.md, "Page
// faults at one position"). PyTorch does the same for all of its allocations when
// THP_MEM_ALLOC_ENABLE=1 is set; this asks for it only on the kernels' own large tensors.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace protokern::cpu {

// At and above this size a tensor's storage is advised (4 huge pages: smaller ones would gain
// little and could share their pages with the heap's other chunks).
inline constexpr int64_t kHugePageAdviceBytes = int64_t{8} << 20;

// Asks the kernel to back the 2 MiB-aligned interior of `tensor`'s storage with huge pages
// (madvise MADV_HUGEPAGE), before anything touches it. Only a request: without transparent huge
// pages ("never"), or where the kernel refuses, nothing changes, not even the values. Returns
// `tensor`.
inline at::Tensor advise_huge_pages(at::Tensor tensor) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = static_cast<int64_t>(tensor.storage().nbytes());
  if (bytes < kHugePageAdviceBytes) return tensor;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(tensor.storage().data());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (first < last) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return tensor;
}

// at::empty, advised as above.
inline at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return advise_huge_pages(at::empty(sizes, options));
}

// A tensor of zeros that costs nothing until it is touched: its storage comes from calloc, whose
// large blocks are fresh mappings that glibc does not clear (the OS hands out zeroed pages on
// first touch), advised as above, so a read maps the shared zero page (a huge one where allowed)
// and a write faults in a zeroed page. For an output that is all zeros and usually never read:
// the one-position forward's (B, M) int64 indices, which at cil_vectors (82 MB) had cost the
// OS's clearing of every page plus the kernel's own fill of zeros, together about 17 ms of a
// 67 ms call (benchmarks/NOTES.md, "The one-position forward as one product"). Its storage is
// not resizable (at::from_blob).
inline at::Tensor zeros_untouched(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                       c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  void* data = std::calloc(std::max<size_t>(bytes, 1), 1);
  TORCH_CHECK_WITH(OutOfMemoryError, data != nullptr, "protokern: could not allocate ", bytes,
                   " bytes of zeros");
  at::Tensor tensor = at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
  return advise_huge_pages(tensor);
}

}  // namespace protokern::cpu
