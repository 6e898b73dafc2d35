"""A fused forward pass of the AST for GPUs in half precision.

Same function as :meth:`AudioSpectrogramTransformer.forward`, with fewer passes over the
activations, which is what bounds the non-matmul part of a batch on a GPU:

- the residual stream is updated inside the projection and fc2 GEMMs (``addmm_`` with the
  stream as C) instead of by separate adds;
- the biases of those two GEMMs are not added to the stream at all: they accumulate in a
  per-channel ``shift`` vector that the next LayerNorm adds on the fly — one fused kernel
  (compiled by Inductor) that reads the stream once and writes the normalised tokens once;
- fc1's bias and GELU run in the cuBLASLt epilogue (its GELU is the tanh approximation,
  within 1e-3 of the exact one: far below bf16's own rounding, so only used in bf16/fp16);
- the last layer computes only the two tokens the head reads.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from streamer.model.ast import POOLED_TOKENS, AudioSpectrogramTransformer, Block

log = logging.getLogger(__name__)


def _shifted_layer_norm(
    s: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(s + shift)`` in fp32, returned in ``s``'s dtype."""
    return F.layer_norm(s.float() + shift, (s.shape[-1],), weight.float(), bias.float(), eps).to(s.dtype)


class FusedForward:
    """Callable ``(B, T, F) → logits`` over a (half-precision, GPU) AST's own weights."""

    def __init__(self, model: AudioSpectrogramTransformer, compile_norm: bool = True) -> None:
        self.model = model
        self.eps = model.config.layer_norm_eps
        act = model.config.hidden_act
        self._epilogue = {"gelu": True, "gelu_new": True, "gelu_pytorch_tanh": True, "relu": False}.get(act)
        self._norm = _shifted_layer_norm
        if compile_norm:
            try:
                compiled = torch.compile(_shifted_layer_norm, dynamic=True)
                p = next(model.parameters())
                d = model.config.hidden_size
                probe = torch.zeros(3, d, device=p.device, dtype=p.dtype)
                compiled(probe, torch.zeros(d, device=p.device), model.norm.weight, model.norm.bias, self.eps)
                self._norm = compiled
            except Exception as exc:  # no compiler toolchain: the eager norm is as correct, just slower
                log.warning("fused norm not compiled (%s: %s); using eager LayerNorm", type(exc).__name__, exc)

    def _fc1(self, block: Block, y: torch.Tensor) -> torch.Tensor:
        fc1 = block.mlp.fc1
        if self._epilogue is None:
            return block.mlp.act(F.linear(y, fc1.weight, fc1.bias))
        return torch._addmm_activation(fc1.bias, y, fc1.weight.t(), use_gelu=self._epilogue)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        h = m.embed(x.to(m.pos_embed.dtype))
        batch, tokens, dim = h.shape
        s = h.reshape(batch * tokens, dim)
        shift = torch.zeros(dim, device=s.device, dtype=torch.float32)
        *blocks, last = m.blocks
        for block in blocks:
            y = self._norm(s, shift, block.norm1.weight, block.norm1.bias, self.eps)
            a = block.attn(y.view(batch, tokens, dim), None, project=False)
            s.addmm_(a.reshape(batch * tokens, dim), block.attn.proj.weight.t())
            shift = shift + block.attn.proj.bias.float()
            y = self._norm(s, shift, block.norm2.weight, block.norm2.bias, self.eps)
            s.addmm_(self._fc1(block, y), block.mlp.fc2.weight.t())
            shift = shift + block.mlp.fc2.bias.float()
        y = self._norm(s, shift, last.norm1.weight, last.norm1.bias, self.eps)
        attn = last.attn(y.view(batch, tokens, dim), POOLED_TOKENS)
        pooled = (s.view(batch, tokens, dim)[:, :POOLED_TOKENS].float() + shift + attn.float()).to(s.dtype)
        pooled = pooled + last.mlp(last.norm2(pooled))
        return m.forward_head(m.norm(pooled))
