"""GPU kernels the stock operators lack, with plain PyTorch fallbacks.

``shifted_layer_norm(s, shift, w, b)`` is ``LayerNorm(s + shift)`` in one pass: the fused
forward keeps the residual stream without its accumulated biases (they live in ``shift``),
and this kernel adds them while normalising, reading the stream once and writing the
normalised tokens once. On CUDA it is a Triton kernel; elsewhere (or without Triton) it is
the same arithmetic in PyTorch. Setting ``TRITON_INTERPRET=1`` runs the Triton kernel on
the CPU, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ROWS_PER_PROGRAM = 4
NUM_WARPS = 4

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

if triton is not None:

    @triton.jit
    def _shifted_layer_norm_kernel(
        s_ptr, shift_ptr, w_ptr, b_ptr, out_ptr, n_rows, n_cols, stride_s, stride_out, eps,
        ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        col_ok = cols < n_cols
        ok = (rows < n_rows) & col_ok
        x = tl.load(s_ptr + rows * stride_s + cols, mask=ok, other=0.0).to(tl.float32)
        x += tl.load(shift_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1)[:, None] / n_cols
        centred = tl.where(col_ok, x - mean, 0.0)
        var = tl.sum(centred * centred, axis=1)[:, None] / n_cols
        y = centred * tl.rsqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows * stride_out + cols, (y * w + b).to(out_ptr.dtype.element_ty), mask=ok)


def triton_usable(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def shifted_layer_norm(
    s: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(s + shift)`` over the last dimension of a 2-D ``s``, in ``s``'s dtype (fp32 math)."""
    if not triton_usable(s):
        return F.layer_norm(s.float() + shift, (s.shape[-1],), weight.float(), bias.float(), eps).to(s.dtype)
    rows, cols = s.shape
    out = torch.empty_like(s)
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    _shifted_layer_norm_kernel[grid](
        s, shift, weight, bias, out, rows, cols, s.stride(0), out.stride(0), eps,
        ROWS=ROWS_PER_PROGRAM, BLOCK=triton.next_power_of_2(cols), num_warps=NUM_WARPS,
    )
    return out
