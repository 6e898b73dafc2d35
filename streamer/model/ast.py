"""The Audio Spectrogram Transformer in plain PyTorch.

Same function as transformers' ``ASTForAudioClassification`` (Gong et al., 2021), laid out
the way timm lays out a ViT: a fused ``qkv`` projection feeding
``F.scaled_dot_product_attention`` (with a plain math fallback), ``forward_features`` and
``forward_head``, and ``nn.Identity`` for a switched-off head. Checkpoints in the Hugging
Face layouts are adapted by :func:`streamer.model.checkpoint.checkpoint_filter_fn`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamer.model.config import ASTConfig

POOLED_TOKENS = 2  # the cls and distillation tokens, whose mean the head classifies

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
    "swish": lambda: nn.SiLU(),
}


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, fused_attn: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, queries: int | None = None, project: bool = True) -> torch.Tensor:
        """Attend over all tokens; with ``queries`` only the first that many tokens ask.

        Only the cls and distillation tokens of the last layer reach the head, so the last
        layer computes just their queries (exactly the same numbers, far less work).
        """
        batch, tokens, dim = x.shape
        if queries is None or type(self.qkv) is not nn.Linear:  # e.g. int8-quantised: no weight slices
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            if queries is not None:
                q = q[:, :, :queries]
        else:
            bias = self.qkv.bias
            q = F.linear(x[:, :queries], self.qkv.weight[:dim], None if bias is None else bias[:dim])
            q = q.reshape(batch, queries, self.num_heads, self.head_dim).transpose(1, 2)
            kv = F.linear(x, self.qkv.weight[dim:], None if bias is None else bias[dim:])
            k, v = kv.reshape(batch, tokens, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(batch, q.shape[2], dim)
        return self.proj(x) if project else x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer encoder layer."""

    def __init__(self, config: ASTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(dim, config.num_attention_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """With ``queries``, return only the first ``queries`` tokens (see :class:`Attention`)."""
        y = self.attn(self.norm1(x), queries)
        x = (x if queries is None else x[:, :queries]) + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """The 16×16 strided patch convolution, computed as one matrix product.

    The weights keep the convolution's shape (so checkpoints map one to one), but the
    patches are gathered with a strided view and multiplied in a single GEMM: with one
    input channel, a convolution kernel wastes most of the GPU, a GEMM does not.
    """

    def __init__(self, config: ASTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.patch_size = p
        self.strides = (config.frequency_stride, config.time_stride)
        self.grid = config.grid
        self.weight = nn.Parameter(torch.empty(config.hidden_size, 1, p, p))
        self.bias = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, F)`` → ``(B, patches, hidden)``, patches in frequency-major order."""
        if torch.onnx.is_in_onnx_export():
            # exporters cannot express as_strided; the equivalent convolution is one ONNX Conv
            conv = F.conv2d(x.transpose(1, 2).unsqueeze(1), self.weight, self.bias, self.strides)
            return conv.flatten(2).transpose(1, 2)
        x = x.contiguous()
        batch, frames, bins = x.shape
        (fs, ts), (nf, nt), p = self.strides, self.grid, self.patch_size
        patches = x.as_strided((batch, nf, nt, p, p), (frames * bins, fs, ts * bins, 1, bins))
        return F.linear(patches.reshape(batch, nf * nt, p * p), self.weight.reshape(self.weight.shape[0], -1), self.bias)


class ClassifierHead(nn.Module):
    """LayerNorm then Linear on the pooled token; Linear is Identity for a 0-label model."""

    def __init__(self, config: ASTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc: nn.Module = (
            nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class AudioSpectrogramTransformer(nn.Module):
    """AST: 16×16 patches of a (time × mel) spectrogram, cls + distillation tokens, ViT encoder.

    Input: normalised filterbank windows of shape ``(batch, max_length, num_mel_bins)``.
    Output of :meth:`forward`: logits ``(batch, num_labels)``; :meth:`probabilities`
    turns them into scores (sigmoid for multi-label heads, softmax otherwise).
    """

    def __init__(self, config: ASTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 2, dim))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.head = ClassifierHead(config)

    def set_fused_attn(self, enabled: bool) -> None:
        """Switch between SDPA kernels and the plain math path (for checks and odd backends)."""
        for block in self.blocks:
            block.attn.fused_attn = enabled

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, F)`` features → ``(B, 2 + patches, hidden)`` input tokens."""
        x = self.patch_embed(x)
        batch = x.shape[0]
        x = torch.cat((self.cls_token.expand(batch, -1, -1), self.dist_token.expand(batch, -1, -1), x), dim=1)
        return x + self.pos_embed

    def forward_features(self, x: torch.Tensor, pooled_only: bool = False) -> torch.Tensor:
        """``(B, T, F)`` features → ``(B, 2 + patches, hidden)`` normalised tokens.

        With ``pooled_only`` just the two tokens the head reads, ``(B, 2, hidden)``; the
        last layer then skips the other tokens' queries and MLP.
        """
        x = self.embed(x)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, POOLED_TOKENS if pooled_only and i == last else None)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the cls and distillation tokens (their mean) and classify."""
        pooled = (x[:, 0] + x[:, 1]) / 2
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, pooled_only=True))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores in [0, 1]: independent sigmoids for multi-label heads, else a softmax."""
        logits = logits.float()
        return logits.sigmoid() if self.config.multi_label else logits.softmax(dim=-1)
