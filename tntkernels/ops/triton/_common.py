"""What the Triton kernels of every family share: supported dtypes, block-size helpers, the device
guard of a launch, and the @triton.jit helpers (IEEE dot, tile loads, LayerNorm, GELU, LeakyReLU).

The jit helpers are defined only when triton is installed; block-size helpers and limits are plain
Python so that the registry can read them without triton.
"""
from __future__ import annotations

import contextlib

import torch

from ... import _backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every Triton kernel of the package takes


def next_pow2(n: int, low: int = 16) -> int:
    """The smallest power of two >= max(n, low); `low` 16 because tl.dot needs dimensions >= 16."""
    return max(low, 1 << (max(n, 1) - 1).bit_length())


def device_guard(t: torch.Tensor):
    """Launch under t's device, so kernels on a second GPU run there (a no-op for CPU tensors)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


_OPTIN_KB: dict[int, int] = {}


@torch._dynamo.assume_constant_result  # a device property: torch.compile takes it as a constant
def _optin_kb(index: int) -> int:
    if index not in _OPTIN_KB:
        props = torch.cuda.get_device_properties(index)
        _OPTIN_KB[index] = int(getattr(props, "shared_memory_per_block_optin", 0) or 166_912) // 1024
    return _OPTIN_KB[index]


def shared_limit_kb(device: torch.device) -> int | None:
    """The most shared memory (KB) one block may opt in to on a CUDA device (227 on H100 / H200, 163 on
    A100, 99 on sm_86 / sm_89); None for a CPU device (the interpreter has no limit)."""
    if device.type != "cuda":
        return None
    return _optin_kb(device.index if device.index is not None else torch.cuda.current_device())


def check_fits(op: str, why: str | None) -> None:
    """Raise the range error of an explicitly called launcher: `why` is its family's `unsupported`."""
    if why is not None:
        raise ValueError(f"{op}: the 'triton' backend does not support {why}")


if _backend.triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def dot_ieee(a, b):
        """tl.dot in IEEE precision (no TF32 for fp32 inputs), fp32 accumulation."""
        return tl.dot(a, b, input_precision="ieee")

    @triton.jit
    def dot_as(a, b, like):
        """a · b with fp32 accumulation, the operands rounded to `like`'s dtype: IEEE fp32 for float32,
        else 16-bit tensor-core inputs, as PyTorch's 16-bit matmul rounds them (for gradients: a
        forward activation whose sign picks a branch wants `dot_near_fp32`). K >= 16, or 8 (padded
        as in `dot_k16`)."""
        return dot_k16(a.to(like.dtype), b.to(like.dtype), "ieee")

    @triton.jit
    def dot_near_fp32(a, b, like):
        """fp32 a · b: IEEE for a float32 `like`, else 3xTF32 (tensor cores, error close to fp32's).
        For 16-bit models' activations whose signs pick a branch (LeakyReLU): rounding them to 16 bits
        flips kinks the fp32 reference does not. K >= 16, or 8 (padded as in `dot_k16`)."""
        if like.dtype == tl.float32:
            return dot_k16(a, b, "ieee")
        else:
            return dot_k16(a, b, "tf32x3")

    @triton.jit
    def dot_k16(a, b, PRECISION: tl.constexpr):
        """tl.dot(a, b, input_precision=PRECISION), fp32 accumulation, for a contraction K of 8 (or
        >= 16): tl.dot needs K >= 16 for 16- and 32-bit inputs on NVIDIA with triton <= 3.7 (its
        `min_dot_size`), so K = 8 is padded to 16 by interleaving zeros into a's columns and b's rows
        (column 2k of a pairs with row 2k of b). a (M, K), b (K, N) -> (M, N) fp32."""
        if a.shape[1] < 16:
            tl.static_assert(a.shape[1] == 8, "dot_k16 pads a contraction of 8 only")
            a16 = tl.reshape(tl.join(a, tl.zeros_like(a)), (a.shape[0], 16))
            b16 = tl.reshape(tl.permute(tl.join(b, tl.zeros_like(b)), (0, 2, 1)), (16, b.shape[1]))
            return tl.dot(a16, b16, input_precision=PRECISION)
        else:
            return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def load_mat(ptr, offs_rows, offs_cols, n_rows, n_cols, stride_row, dt):
        """Masked (rows, cols) tile of a row-major matrix, cast to dt; 0 outside (n_rows, n_cols)."""
        mask = (offs_rows[:, None] < n_rows) & (offs_cols[None, :] < n_cols)
        return tl.load(ptr + offs_rows[:, None] * stride_row + offs_cols[None, :], mask=mask, other=0.0).to(dt)

    @triton.jit
    def load_tile(ptr, s, h, stride_s, stride_h, stride_r, stride_c, offs_r, offs_c, mask):
        """The (rows, cols) tile ptr[s, h, offs_r, offs_c] of a 4-D strided tensor; 0 where masked."""
        return tl.load(ptr + s * stride_s + h * stride_h + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
                       mask=mask, other=0.0)

    @triton.jit
    def load_vec(ptr, offs, n):
        """Masked vector in fp32; 0 at offs >= n."""
        return tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32)

    @triton.jit
    def layer_norm(x, w, b, c_ok, C, eps):
        """Row LayerNorm of an fp32 (rows, BLOCK_C) tile whose padded columns are 0.
        Returns (xhat, rstd, xhat·w + b); padded columns of xhat stay 0."""
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(c_ok[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        xhat = xc * rstd[:, None]
        return xhat, rstd, xhat * w[None, :] + b[None, :]

    @triton.jit
    def layer_norm_bwd(dxn, xhat, rstd, w, c_ok, C):
        """d input of `layer_norm` from d output dxn (fp32 tiles; padded columns 0)."""
        dxhat = dxn * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / C
        c2 = tl.sum(dxhat, axis=1) / C
        return tl.where(c_ok[None, :], (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)

    @triton.jit
    def gelu(h):
        """Exact (erf) GELU, as torch.nn.GELU()."""
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))

    @triton.jit
    def gelu_grad(h):
        """d GELU(h) / dh."""
        return 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)

    @triton.jit
    def leaky_relu(x, SLOPE: tl.constexpr):
        return tl.where(x > 0, x, x * SLOPE)
