"""A fused forward pass of the AST for GPUs in half precision.

Same function as :meth:`AudioSpectrogramTransformer.forward`, with fewer passes over the
activations, which is what bounds the non-matmul part of a batch on a GPU:

- the residual stream is updated inside the projection and fc2 GEMMs (``addmm_`` with the
  stream as C) instead of by separate adds;
- the biases of those two GEMMs are not added to the stream at all: they accumulate in a
  per-channel ``shift`` vector that the next LayerNorm adds on the fly — one Triton kernel
  (:mod:`streamer.model.kernels`) that reads the stream once and writes the tokens once;
- fc1's bias and GELU run in the cuBLASLt epilogue (its GELU is the tanh approximation,
  within 1e-3 of the exact one: far below bf16's own rounding, so only used in bf16/fp16);
- the last layer computes only the two tokens the head reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from streamer.model.ast import POOLED_TOKENS, AudioSpectrogramTransformer, Block
from streamer.model.kernels import shifted_layer_norm

ATTENTION_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
]


class FusedForward:
    """Callable ``(B, T, F) → logits`` over a (half-precision, GPU) AST's own weights."""

    def __init__(self, model: AudioSpectrogramTransformer) -> None:
        self.model = model
        self.eps = model.config.layer_norm_eps
        act = model.config.hidden_act
        self._epilogue = {"gelu": True, "gelu_new": True, "gelu_pytorch_tanh": True, "relu": False}.get(act)
        self._norm = shifted_layer_norm

    def _fc1(self, block: Block, y: torch.Tensor) -> torch.Tensor:
        fc1 = block.mlp.fc1
        if self._epilogue is None:
            return block.mlp.act(F.linear(y, fc1.weight, fc1.bias))
        return torch._addmm_activation(fc1.bias, y, fc1.weight.t(), use_gelu=self._epilogue)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # cuDNN's fused attention is the fastest SDPA kernel on Hopper for these shapes;
        # the others stay as fallbacks, in this order, for shapes or cards it does not take.
        with sdpa_kernel(ATTENTION_PRIORITY, set_priority=True):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
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
