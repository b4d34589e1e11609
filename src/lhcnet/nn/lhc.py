"""LHC: Local (multi-)Head Channel self-attention.

Pecoraro, Basile, Bono, Gallo, "Local Multi-Head Channel Self-Attention for Facial Expression
Recognition", arXiv 2111.07224 (2021). Equation numbers (1)-(17) follow the paper's order as
recovered in ``docs/lhc-spec.md`` §1: (1)-(3) Q/K/V, (4)-(6) head split, (7)-(10) the per-head
embedding shared by Q and K, (11) scores, (12)-(15) dynamic scaling and softmax, (16)-(17) output
and reassembly.

What differs from the authors' TensorFlow code: nothing numerically. Their per-head Python loop of
``Dense`` layers is one ``(heads, r, d)`` parameter tensor and an einsum here; their NHWC
reshapes become NCHW ones that give every head the same whole rows (head ``i`` sees rows
``[i*H/n, (i+1)*H/n)`` of every channel). Keras initialisers (Glorot-uniform, zero bias) are kept.
The optional ``gate`` is LHC-NetC's controller: ``y = x + (1 + tanh w) * O``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LHC", "box_mean"]


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or an (H, W) pair of ints, got {value!r}")


def _glorot_uniform_(tensor: torch.Tensor, fan_in: int, fan_out: int) -> None:
    """Keras' default kernel initialiser: U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        tensor.uniform_(-bound, bound)


def box_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF 'same' average pooling, stride 1, padding cells not counted (``count_include_pad=False``).

    Computed as a depthwise convolution with a fixed all-ones kernel divided by the number of
    valid cells: the same numbers as ``F.avg_pool2d``, but its backward pass is 5-10x faster on
    CPU (oneDNN), which made the pools a fifth of a compact LHC-Net's training step.
    """
    # Plain-int shapes: kernels built from traced sizes break the TorchScript-based ONNX exporter.
    channels, height, width, pad = int(x.shape[1]), int(x.shape[2]), int(x.shape[3]), size // 2
    kernel = torch.ones(channels, 1, size, size, dtype=x.dtype, device=x.device)
    sums = F.conv2d(x, kernel, padding=pad, groups=channels)
    counts = F.conv2d(torch.ones(1, 1, height, width, dtype=x.dtype, device=x.device), kernel[:1], padding=pad)
    return sums / counts


class LHC(nn.Module):
    """Local multi-head channel self-attention; input and output ``(B, C, H, W)``.

    Args:
        channels: C, the channel count of the input (and output).
        resolution: H and W of the input feature map, an int or an (H, W) pair.
        heads: n, the number of heads; every head takes H/n whole rows, so n must divide H.
        embed_dim: d, the head embedding dimension (paper: "HED").
        pool_size: p, the window of the Q average pool and the K max pool (odd).
        kernel_size: k, the kernel of the V convolution (odd).
        scale_c: C of eq. (14): scores are divided by d**(C + s) with s in (0, 1).
        gate_init: if given, LHC-NetC's controller w with this initial value:
            ``y = x + (1 + tanh w) * O``; if None (LHC-Net), ``y = x + O``.
    """

    def __init__(
        self,
        channels: int,
        resolution: int | tuple[int, int],
        heads: int,
        embed_dim: int,
        pool_size: int = 3,
        kernel_size: int = 3,
        scale_c: float = 1.0,
        gate_init: float | None = None,
    ) -> None:
        super().__init__()
        height, width = _pair(resolution, "resolution")
        for name, value in (("channels", channels), ("heads", heads), ("embed_dim", embed_dim),
                            ("height", height), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LHC: {name} must be a positive int, got {value!r}")
        if height % heads:
            raise ValueError(
                f"LHC: heads={heads} must divide the feature-map height H={height} so that every "
                f"head gets whole rows (H/heads = {height / heads:g}); valid head counts: "
                f"{[n for n in range(1, height + 1) if height % n == 0]}")
        for name, value in (("pool_size", pool_size), ("kernel_size", kernel_size)):
            if not isinstance(value, int) or value < 1 or value % 2 == 0:
                raise ValueError(f"LHC: {name} must be a positive odd int ('same' padding), got {value!r}")
        self.channels, self.height, self.width = channels, height, width
        self.heads, self.embed_dim = heads, embed_dim
        self.pool_size, self.kernel_size, self.scale_c = pool_size, kernel_size, float(scale_c)
        self.head_len = height // heads * width  # r: pixels per head (whole rows)

        # eq. (3): V = AvgPool3x3(Conv_kxk(x)); the conv maps C -> C with bias.
        self.value_conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        # eqs. (7)-(10): one r -> d linear map per head, shared by Q and K: weight (n, r, d), bias (n, d).
        self.qk_weight = nn.Parameter(torch.empty(heads, self.head_len, embed_dim))
        self.qk_bias = nn.Parameter(torch.zeros(heads, embed_dim))
        # eq. (13): s = sigmoid(W_p m + b_p), a C -> C dense layer shared by all heads.
        self.scale_fc = nn.Linear(channels, channels)
        if gate_init is None:
            self.register_parameter("gate", None)
        else:
            self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras defaults, as in the original: Glorot-uniform kernels, zero biases."""
        k2c = self.kernel_size ** 2 * self.channels
        _glorot_uniform_(self.value_conv.weight, k2c, k2c)
        nn.init.zeros_(self.value_conv.bias)
        _glorot_uniform_(self.qk_weight, self.head_len, self.embed_dim)
        nn.init.zeros_(self.qk_bias)
        _glorot_uniform_(self.scale_fc.weight, self.channels, self.channels)
        nn.init.zeros_(self.scale_fc.bias)

    def extra_repr(self) -> str:
        gate = "" if self.gate is None else ", gated=True"
        return (f"{self.channels}, resolution=({self.height}, {self.width}), heads={self.heads}, "
                f"embed_dim={self.embed_dim}, pool_size={self.pool_size}, "
                f"kernel_size={self.kernel_size}, scale_c={self.scale_c:g}{gate}")

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """eqs. (4)-(6): (B, C, H, W) -> (B, n, C, r); head i holds rows [i*H/n, (i+1)*H/n)."""
        b, c = t.shape[:2]
        return t.reshape(b, c, self.heads, self.head_len).transpose(1, 2)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map A of eq. (15), shape (B, n, C, C); rows sum to 1."""
        return self._attention_and_values(x)[0]

    def _attention_and_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1:] != (self.channels, self.height, self.width):
            raise ValueError(f"LHC expects input (B, {self.channels}, {self.height}, {self.width}), "
                             f"got {tuple(x.shape)}")
        p = self.pool_size
        q = box_mean(x, p)                                                   # (B, C, H, W)  eq. (1)
        k = F.max_pool2d(x, p, 1, p // 2)                                    # (B, C, H, W)  eq. (2)
        v = box_mean(self.value_conv(x), 3)                                  # (B, C, H, W)  eq. (3)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)  # (B, n, C, r)  eqs. (4)-(6)
        # Scores reach 1e2-1e4 on the raw (pre-activation) stream and their softmax is sharp: in
        # bfloat16 (8-bit mantissa) they blew up and training diverged (NaN), so eqs. (7)-(15) run
        # in float32 even under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(self.qk_weight.dtype, torch.float32)  # float64 stays float64
            q, k = q.to(dtype), k.to(dtype)
            weight, bias = self.qk_weight.to(dtype), self.qk_bias.to(dtype).unsqueeze(1)  # (n, r, d), (n, 1, d)
            q = torch.einsum("bncr,nrd->bncd", q, weight) + bias             # (B, n, C, d)  eqs. (7)-(8)
            k = torch.einsum("bncr,nrd->bncd", k, weight) + bias             # (B, n, C, d)  eqs. (9)-(10)
            # eq. (12) m_i = mean_j S_ij = q_i . mean_j k_j (S is linear in k): a (C, d) product, not a
            # mean over the (C, C) scores, which dominate the block's cost on deep, wide maps.
            m = (q @ k.mean(dim=-2).unsqueeze(-1)).squeeze(-1)               # (B, n, C)     eq. (12)
            s = torch.sigmoid(self.scale_fc(m.to(self.scale_fc.weight.dtype))).to(dtype)  # (B, n, C)  eq. (13)
            # eq. (14): N = S / d^(C + s), one divisor per query channel (row of S), applied to q before
            # eq. (11)'s product: N = (q / d^(C + s)) k^T, so no elementwise pass over the (C, C) scores.
            divisor = torch.exp((self.scale_c + s) * math.log(self.embed_dim)).unsqueeze(-1)  # (B, n, C, 1)
            scaled = (q / divisor) @ k.transpose(-1, -2)                     # (B, n, C, C)  eqs. (11), (14)
            attn = torch.softmax(scaled, dim=-1)                             # (B, n, C, C)  eq. (15)
        return attn, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, v = self._attention_and_values(x)
        # eq. (16) in the attention's precision; V (B, n, C, r) is cast, not the larger (B, n, C, C) map.
        out = (attn @ v.to(attn.dtype)).to(v.dtype)                          # (B, n, C, r)  eq. (16)
        out = out.transpose(1, 2).reshape(x.shape)                           # (B, C, H, W)  eq. (17)
        if self.gate is not None:
            out = (1 + torch.tanh(self.gate)) * out                          # LHC-NetC controller
        return x + out
