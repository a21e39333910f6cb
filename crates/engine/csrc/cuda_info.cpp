// The GPU's name (for the peak TFLOP/s that MFU divides by) and the CUDA caching allocator's
// allocated and reserved bytes (for the metrics), without Python. Compiled with CUDA support
// only (USE_C10D_NCCL, set by build.rs when this libtorch has CUDA and its headers); the
// CPU-only build answers "no GPU".
#include <cstdint>
#include <cstdio>

#ifdef USE_C10D_NCCL
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

extern "C" {

// 1 and the name of CUDA device `index` in `buf` (NUL-terminated), or 0 without it.
int mm_cuda_device_name(int index, char* buf, int len) {
#ifdef USE_C10D_NCCL
  try {
    if (index < 0 || index >= static_cast<int>(c10::cuda::device_count())) return 0;
    const cudaDeviceProp* p = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(index));
    std::snprintf(buf, static_cast<size_t>(len), "%s", p->name);
    return 1;
  } catch (...) {
    return 0;
  }
#else
  (void)index;
  (void)buf;
  (void)len;
  return 0;
#endif
}

// 1 and the caching allocator's current allocated and reserved bytes on device `index`.
int mm_cuda_memory(int index, int64_t* allocated, int64_t* reserved) {
#ifdef USE_C10D_NCCL
  try {
    if (index < 0 || index >= static_cast<int>(c10::cuda::device_count())) return 0;
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(index));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[all].current;
    *reserved = stats.reserved_bytes[all].current;
    return 1;
  } catch (...) {
    return 0;
  }
#else
  (void)index;
  (void)allocated;
  (void)reserved;
  return 0;
#endif
}

}  // extern "C"
