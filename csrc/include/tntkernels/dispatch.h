// The dtype dispatch of every op: one macro per set of dtypes, used by the CPU and CUDA backends alike.
// Inside the lambda, scalar_t is the element type (c10::Half, c10::BFloat16, float or double).
#pragma once
#include <ATen/Dispatch.h>

// float16, bfloat16, float32 and float64: the CPU backends and the CUDA kernels that take float64.
#define TNT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// float32, float16 and bfloat16 only: the CUDA kernels that reject float64 before dispatch.
#define TNT_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
