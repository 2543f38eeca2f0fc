// Generic input-check macros for the compiled ops: each raises a RuntimeError (TORCH_CHECK) whose
// message names the argument and what was expected. Op-specific checks live in the op family headers
// (inner_attention.h, nested_attention.h, hsim_split.h).
#pragma once
#include <torch/extension.h>

#define TNT_CHECK_DIM(x, n, dims) \
  TORCH_CHECK((x).dim() == (n), #x " must be " #n "-D " dims ", got shape ", (x).sizes())
#define TNT_CHECK_SHAPE(x, ...) \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ "), got ", (x).sizes())
#define TNT_CHECK_SAME_DTYPE(x, y) \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " has dtype ", (x).scalar_type(), " but " #y " has ", (y).scalar_type())
#define TNT_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define TNT_CHECK_FLOAT(x)                                                                        \
  TORCH_CHECK((x).scalar_type() == at::kHalf || (x).scalar_type() == at::kBFloat16 ||             \
                  (x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble,             \
              #x " must be float16, bfloat16, float32 or float64, got ", (x).scalar_type())
