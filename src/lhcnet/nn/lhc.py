"""LHC: Local (multi-)Head Channel self-attention.

Pecoraro, Basile, Bono, Gallo, "Local Multi-Head Channel Self-Attention for Facial Expression
Recognition", arXiv 2111.07224 (2021). Equation numbers (1)-(17) follow the paper's order as
recovered in ``docs/lhc-spec.md`` §1: (1)-(3) Q/K/V, (4)-(6) head split, (7)-(10) the per-head
embedding shared by Q and K, (11) scores, (12)-(15) dynamic scaling and softmax, (16)-(17) output
and reassembly.

What differs from the authors' TensorFlow code: nothing numerically. Their per-head Python loop of
``Dense`` layers is one ``(heads, r, d)`` parameter tensor and one batched product here; their NHWC
reshapes become NCHW ones that give every head the same whole rows (head ``i`` sees rows
``[i*H/n, (i+1)*H/n)`` of every channel). Keras initialisers (Glorot-uniform, zero bias) are kept.
The optional ``gate`` is LHC-NetC's controller: ``y = x + (1 + tanh w) * O``; the optional
``layer_scale_init`` (not the paper's) a per-channel LayerScale/ReZero scale of ``O``.

Speed (issue 12; ``benchmarks/lhc_speed.py``, 2-core Zen 4, figures per block forward + backward,
1 thread, compact model batch 64 bf16 + channels-last, paper model batch 16 fp32). Profile of the
previous implementation (``tests/lhc_previous.py``):
- compact stem/stage 1 (48 x 24 x 24, r = 72 > C): ~120 ms each, of which the value conv 14 ms,
  the max pool 21 ms (its backward, a scatter through int64 indices, is 3x its forward), dtype and
  layout copies between the bf16 channels-last stream and the fp32 head split ~35 % of the
  profile, the Q/K embedding products ~15 %, the gradient sum of x's four uses ~7 %;
- compact stages 3/4 (C = 192/384, r = 6/9): ~70 % on the C x C maps (softmax and its backward,
  map-sized copies, products with inner dimension 3-9). On a trained model's stream 1-4 % of the
  attention weights are denormal (< 1.2e-38) and every product with them runs 3-10x slower: a
  trained stage-3 block took 246 ms instead of 136;
- paper stem (64 x 56 x 56, fp32 NCHW): of 387 ms, the value conv 89, the contiguous-tensor max
  pool forward 61 (PyTorch's CPU kernel is vectorised only for channels-last), the embeddings 66.
What won (kept): the chunked attention with its own backward and the denormal guard
(``channel_attention``): trained stage 3 246 -> 101 ms, stage 4 126 -> 90, untrained 136 -> 97
and 102 -> 88; storing the maps when small (stem, stage 1)
rather than recomputing them: attention core 30 -> 27 ms; channels-last max pool for contiguous
input: paper stem pool forward 61 -> 9 ms (plus ~20 ms of layout copies); window counts computed
once, not by a convolution per call (paper stem: box-mean backward 25 -> 14 ms). Neutral (within +-3 %, kept
because they are simpler): one product for Q and K, the head split and reassembly as views of
either layout. What lost (dropped): ``scaled_dot_product_attention(q', k, v, scale=1.0)`` uses the
slow math path because r != d; with q, k, v zero-padded to one size the CPU flash kernel is 2-4x
faster than the three-op chain on stages 3/4 *without* denormals, 1.6-1.9x slower where C < r
(stem), and as denormal-bound as the chain (trained stage 3: 151 ms vs 95 for the guarded chunks);
bf16 for the embeddings needs a bf16 product with float32 output, which CPU PyTorch lacks
(``aten::bmm.dtype`` is CUDA-only), and bf16 Q/K would round the scores' inputs (the NaN of
docs/results.md), so eqs. (7)-(16) stay float32; ``torch.compile`` of a block (inductor, plain
chain): stem 145 -> 130 ms, stage 3 143 -> 196 (it materialises the maps), 1-2 min compile per
block; leaving the max-pool output channels-last for the head split: 2x slower backward.
Second round (kept): under bf16 autocast the four products with a C x C map (A V, A^T dO, dS K,
dS^T Q) take the map rounded to bf16 while the scores, the softmax and dS stay float32 (on Zen 4
a bf16 (g, C, C) x (g, C, 3..72) product is 3-5x faster than the float32 one, whose kernels are
slowest for these thin shapes); the output and dV keep v's memory layout (no mixed-layout
elementwise work in the backward); chunks of 2 MB of maps per thread instead of 512 KB. The bf16
products start from centred keys and queries (dS's rows sum to 0), or the raw stream's common
offset would dominate their rounding error; the LHC parameters' gradients then differ from the
float32 ones as much as the host's own parameters' do under bf16 autocast (~25-80 % relative on a
trained model at batch 64, as before this change). In-process A/B (the same block, float32 vs bf16
products, interleaved): stage 3/4 10-20 % faster, the others neutral. The largest single cost
found was outside the block: glibc unmapping freed multi-MB tensors, so every step page-faults
them in again (``lhcnet.allocator``, applied by ``lhcnet train``); with it the previous chain
implementation is about as fast per block as this one in bf16 + channels-last
(``docs/runs/benchmarks/lhc_speed-2026-12-03.txt``; run-to-run spread on this shared machine
+-15 %). What remains is per-block fixed work in eager mode (value conv, three pools, ~20
elementwise passes over the block's tensors) that only kernel fusion would remove.
Third round (kept): MKL's float32 products with a thin output, a C x C map times a (C, 3..9)
value or key (compact stages 3/4: A V, A^T dO, dS k, dS^T q), run 4-7x slower than the same
product swapped, ``(b^T a^T)^T``; they are now computed swapped (``_thin``), with a copy where the
output must be contiguous: float32 stage-3/4 blocks 1.35-1.6x faster forward + backward, bf16
ones ~1.1x. The softmax of a chunk is ``torch.softmax`` in place after the clamp (its fused
kernel ~1.4x faster than sub, clamp, exp, div). ``torch.compile`` of the whole compact LHC-Net
(training step, bf16 + channels-last, 1 thread): 1.15 s vs 1.145 eager, no gain.
The floor (``benchmarks/lhc_speed.py`` section 2, "V path"): eq. (3)'s conv + box mean, 78 % of
the compact blocks' FLOPs (67 % of the paper's), alone would give training-step ratios 1.33
(compact, bf16 + CL) and 1.14 (paper); the rest, ~70 % of the compact blocks' time, is small
memory-bound kernels. The box mean as a depthwise conv stays the fastest of the variants measured
(forward + backward, 1-2 threads: separable shifted sums 1.6-2.7x, the conv in channels-last
1.2-2.1x, ``avg_pool2d`` 1.6-5.2x slower).
Fourth round (dropped, commit ab50615, ``docs/runs/benchmarks/lhc_speed-2026-12-04-fused-sdpa.txt``):
flush-to-zero for the whole process (``torch.set_flush_denormal`` before the thread pool starts,
as TensorFlow's thread pools do) removes the denormal cost of ``scaled_dot_product_attention``, and
in isolation (1 thread, float32 contiguous q, k, v of the bundled model, zero-padded to one width)
its fused kernel then took 55 ms instead of 108 (stage 3) and 24 instead of 47 (stage 4) for
forward + backward. Inside the compact model (2 threads, bf16 + channels-last, with its pads, casts
and copies) it lost: stage 3 81 ms vs 61 for these chunks, stage 4 67 vs 53, training-step ratio
2.89 vs 2.31 in the same session. Flushing alone gains nothing here (the chunks already floor the
logits); it does speed up the plain chain on trained weights (97 -> 55 ms at stage 3).
Whole-model ratios: ``docs/training.md`` (Speed) and ``benchmarks/lhc_speed.py``.
"""
from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=64)
def _window_counts(size: int, height: int, width: int) -> torch.Tensor:
    """Valid cells of every 'same' size x size window on a height x width map, (H, W) float64."""
    half = size // 2
    rows = [min(i + half, height - 1) - max(i - half, 0) + 1 for i in range(height)]
    cols = [min(j + half, width - 1) - max(j - half, 0) + 1 for j in range(width)]
    return torch.tensor([[float(r * c) for c in cols] for r in rows], dtype=torch.float64)


def box_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF 'same' average pooling, stride 1, padding cells not counted (``count_include_pad=False``).

    Computed as a depthwise convolution with a fixed all-ones kernel divided by the number of
    valid cells: the same numbers as ``F.avg_pool2d``, but its backward pass is 5-10x faster on
    CPU (oneDNN), which made the pools a fifth of a compact LHC-Net's training step. The counts
    are a constant of the map size (computed once, not by a second convolution per call).
    """
    # Plain-int shapes: kernels built from traced sizes break the TorchScript-based ONNX exporter.
    channels, height, width, pad = int(x.shape[1]), int(x.shape[2]), int(x.shape[3]), size // 2
    kernel = torch.ones(channels, 1, size, size, dtype=x.dtype, device=x.device)
    sums = F.conv2d(x, kernel, padding=pad, groups=channels)
    return sums / _window_counts(size, height, width).to(device=x.device, dtype=x.dtype)


def _is_channels_last(t: torch.Tensor) -> bool:
    """Laid out channels-last (and not also contiguous, as tensors with H = W = 1 are)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def max_pool_same(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF 'same' max pooling, stride 1 (padding with -inf): ``F.max_pool2d(x, size, 1, size // 2)``.

    PyTorch's CPU max pool is ~8x faster forward on a channels-last tensor than on a contiguous
    one (vectorised over channels), so a contiguous input is pooled in channels-last and the
    result handed back contiguous: the same numbers and the same gradients (the first maximal
    cell of each window gets it), ~2.5x faster forward + backward in fp32.
    """
    if x.device.type != "cpu" or not x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, size, 1, size // 2)
    return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), size, 1, size // 2).contiguous()


# exp(-40) = 4e-18: attention weights below this fraction of a row's largest are raised to it.
_LOGIT_SPREAD = 40.0


def _attention_chunk(q: torch.Tensor, k: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T) over the last axis, (G, C, d) x (G, C, d) -> (G, C, C) (into ``out`` if
    given), with the logits floored at their row's max - 40 (no denormal weights; see
    ``channel_attention``)."""
    scores = torch.bmm(q, k.transpose(1, 2), out=out)
    # In place: S = max(S, rowmax - 40), then softmax (one fused kernel, ~1.4x faster than
    # sub, clamp, exp and div as four passes).
    torch.maximum(scores, scores.amax(dim=-1, keepdim=True).sub_(_LOGIT_SPREAD), out=scores)
    return torch.softmax(scores, dim=-1, out=scores)


def _thin(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a @ b``, (G, M, K) x (G, K, N), has a thin N (4 N <= M): a C x C map times a
    (C, 3..9) value or key of a compact model's stages 3/4. MKL's kernels for such a product are
    4-7x slower in float32 (up to 1.5x in bf16) than for the swapped one, ``(b^T a^T)^T``."""
    return 4 * b.shape[2] <= a.shape[1]


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``, computed as ``(b^T a^T)^T`` (a transposed result) when N is thin."""
    if _thin(a, b):
        return torch.bmm(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(a, b)


def _bmm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` for an ``out`` that is contiguous or the transpose of a contiguous tensor
    (then computed as ``out^T = b^T a^T``: no temporary, no copy); a contiguous ``out`` with a
    thin N takes the swapped product and a copy (``_thin``: still 3-6x faster in float32)."""
    if not out.is_contiguous():
        torch.bmm(b.transpose(1, 2), a.transpose(1, 2), out=out.transpose(1, 2))
    elif _thin(a, b):
        out.copy_(_bmm(a, b))
    else:
        torch.bmm(a, b, out=out)


def _like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty (G, C, r) tensor laid out as ``t``: contiguous, or (G, r, C) contiguous seen
    transposed (the head split of a channels-last map)."""
    if t.is_contiguous() or not t.transpose(1, 2).is_contiguous():
        return torch.empty(t.shape, dtype=dtype, device=t.device)
    return torch.empty(t.shape[0], t.shape[2], t.shape[1], dtype=dtype, device=t.device).transpose(1, 2)


def _unflatten(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(G, C, r) back to ``shape`` (lead dims, C, r) as a view, in either of ``_like``'s layouts."""
    if t.is_contiguous():
        return t.view(shape)
    return t.transpose(1, 2).view(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)


class _ChannelAttention(torch.autograd.Function):
    """``softmax(q k^T) v`` in chunks of heads that keep the C x C maps in cache. The backward
    pass recomputes each chunk's map (as flash attention does) when all maps together exceed
    ``_STORE_BYTES``, and reads them back otherwise.

    Scores, softmax and the softmax backward are float32 (float64 stays float64). When ``v`` has
    a lower dtype (bfloat16 under autocast), the four products with a map, A v and the gradients
    A^T dO, dS k, dS^T q, take the map rounded to that dtype: 3-5x faster on CPU, and only what
    the forward's O (returned in v's dtype) and the gradients lose to bf16 rounding. The output
    and v's gradient have v's memory layout (a channels-last head split stays channels-last), so
    that neither the residual sum nor the elementwise work of the backward mixes layouts."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, store: bool) -> torch.Tensor:
        ctx.shapes = q.shape, k.shape, v.shape
        c, r = q.shape[-2], v.shape[-1]
        q, k, v = q.reshape(-1, c, q.shape[-1]), k.reshape(-1, c, k.shape[-1]), v.reshape(-1, c, r)
        out = _like(v, v.dtype)
        maps = torch.empty(q.shape[0], c, c, dtype=q.dtype, device=q.device) if store else None
        for i in range(0, q.shape[0], chunk):
            part = slice(i, i + chunk)
            attn = _attention_chunk(q[part], k[part], None if maps is None else maps[part])
            _bmm_into(attn.to(v.dtype), v[part], out[part])
        ctx.save_for_backward(q, k, v, out, maps)
        ctx.chunk = chunk
        return _unflatten(out, ctx.shapes[2])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        q, k, v, out, maps = ctx.saved_tensors
        low = v.dtype                                                           # the maps' products
        grad_low = grad_out.reshape(out.shape).to(low)
        # dS = dO v^T - rowsum(dA * A) in float32: a difference of near-equal terms
        grad_full, v_full = grad_low.to(q.dtype), v.to(q.dtype)
        # softmax backward: dS = A * (dA - rowsum(dA * A)), and rowsum(dA * A) = rowsum(dO * O).
        row_dot = (grad_full * out.to(q.dtype)).sum(dim=-1, keepdim=True)     # (G, C, 1)
        mixed = low != q.dtype
        if mixed:  # dS's rows sum to 0, so dS k = dS (k - mean k): the bf16 product takes centred
            # keys (their common offset, large on the raw stream, would swamp their differences in
            # bf16); likewise dS^T q = dS^T (q - mean q) + colsum(dS) mean q, the last in float32.
            q_mean = q.mean(dim=1, keepdim=True)                               # (G, 1, d)
            q_low, k_low = (q - q_mean).to(low), (k - k.mean(dim=1, keepdim=True)).to(low)
        else:
            q_low, k_low = q, k
        grad_q, grad_k = torch.empty(q.shape, dtype=low, device=q.device), torch.empty_like(k)
        grad_v = _like(v, low)
        for i in range(0, q.shape[0], ctx.chunk):
            part = slice(i, i + ctx.chunk)
            attn = _attention_chunk(q[part], k[part]) if maps is None else maps[part]  # (g, C, C)
            grad_scores = torch.bmm(grad_full[part], v_full[part].transpose(1, 2)).sub_(row_dot[part]).mul_(attn)
            if mixed:
                torch.mul(grad_scores.sum(dim=1).unsqueeze(-1), q_mean[part], out=grad_k[part])
                grad_scores, attn = grad_scores.to(low), attn.to(low)
                grad_k[part] += _bmm(grad_scores.transpose(1, 2), q_low[part])
            else:
                _bmm_into(grad_scores.transpose(1, 2), q[part], grad_k[part])
            _bmm_into(grad_scores, k_low[part], grad_q[part])
            _bmm_into(attn.transpose(1, 2), grad_low[part], grad_v[part])
        q_shape, k_shape, v_shape = ctx.shapes
        return grad_q.to(q.dtype).reshape(q_shape), grad_k.reshape(k_shape), _unflatten(grad_v, v_shape), None, None


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """eqs. (11), (15), (16): ``softmax(q k^T) v`` per head, (B, n, C, d), (B, n, C, d), (B, n, C, r) -> (B, n, C, r).

    The scores and the softmax in q's dtype (float32 or float64); the product with v, and the
    result, in v's (a bfloat16 v under autocast: see ``_ChannelAttention``).

    The scale of eq. (14) is already in ``q``. Two things make this faster than the three-op
    chain, with the same numbers:
    - the heads are processed in chunks whose C x C maps fit in the L2 cache, and when the maps
      of all heads are large (a compact LHC-Net's stage-3 maps are 57 MB per batch of 64) the
      backward pass recomputes a chunk's map instead of storing them all;
    - logits more than 40 below their row's maximum are raised to max - 40 before the softmax.
      Sharp rows (trained blocks: up to 4 % of the weights) otherwise hold denormal weights
      (< 1.2e-38), and every multiply with a denormal costs ~100 cycles on x86: the matrix
      products slowed down 3-10x. The weights changed are below 4e-18 of their row's largest, so
      an output moves by less than ``C * 4e-18 * max|v|``: nothing in float32, < 1e-12 in the
      float64 reference test.
    Under tracing, export or ``torch.compile`` the plain chain is used (no data-dependent loop).
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1).to(v.dtype) @ v
    c, map_bytes = q.shape[-2], q.shape[-2] ** 2 * q.element_size()
    chunk = max(1, _CHUNK_BYTES * torch.get_num_threads() // map_bytes)  # each thread's share in its L2
    store = torch.is_grad_enabled() and q.numel() // (c * q.shape[-1]) * map_bytes <= _STORE_BYTES
    return _ChannelAttention.apply(q, k, v, chunk, store)


_HALF_DTYPES = (torch.bfloat16, torch.float16)
_STORE_BYTES = 8 * 2**20  # all maps at most this large: stored for the backward (stem, stage 1), not recomputed
_CHUNK_BYTES = 2 * 2**20  # C x C maps per chunk and thread (measured: 256 KB-64 MB; 2 MB best with bf16 products)


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
        layer_scale_init: if given (not the paper's), a learnable per-channel scale gamma of the
            attention output with this initial value, ``y = x + gamma * O`` (LayerScale, Touvron
            et al. 2021; ReZero at 0): at 0 the block starts as the identity and lets the
            attention in as gamma grows. None (default): the paper's plain sum.
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
        layer_scale_init: float | None = None,
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
        self.layer_scale_init = None if layer_scale_init is None else float(layer_scale_init)
        if self.layer_scale_init is None:
            self.register_parameter("layer_scale", None)
        else:
            self.layer_scale = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras defaults, as in the original: Glorot-uniform kernels, zero biases; the layer
        scale (if any) back to its initial value. The gate is the controller's and is kept."""
        k2c = self.kernel_size ** 2 * self.channels
        _glorot_uniform_(self.value_conv.weight, k2c, k2c)
        nn.init.zeros_(self.value_conv.bias)
        _glorot_uniform_(self.qk_weight, self.head_len, self.embed_dim)
        nn.init.zeros_(self.qk_bias)
        _glorot_uniform_(self.scale_fc.weight, self.channels, self.channels)
        nn.init.zeros_(self.scale_fc.bias)
        if self.layer_scale is not None:
            nn.init.constant_(self.layer_scale, self.layer_scale_init)

    def extra_repr(self) -> str:
        gate = "" if self.gate is None else ", gated=True"
        scale = "" if self.layer_scale is None else f", layer_scale_init={self.layer_scale_init:g}"
        return (f"{self.channels}, resolution=({self.height}, {self.width}), heads={self.heads}, "
                f"embed_dim={self.embed_dim}, pool_size={self.pool_size}, "
                f"kernel_size={self.kernel_size}, scale_c={self.scale_c:g}{gate}{scale}")

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """eqs. (4)-(6): (B, C, H, W) -> (B, n, C, r); head i holds rows [i*H/n, (i+1)*H/n).

        A view in both memory layouts: channels-last memory is (B, H, W, C), where head i's rows
        are one (r, C) block, so the head split of a channels-last tensor needs no copy either."""
        b, c, h, w = t.shape
        if _is_channels_last(t):
            return t.permute(0, 2, 3, 1).reshape(b, self.heads, self.head_len, c).transpose(2, 3)
        return t.reshape(b, c, self.heads, self.head_len).transpose(1, 2)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[1:] != (self.channels, self.height, self.width):
            raise ValueError(f"LHC expects input (B, {self.channels}, {self.height}, {self.width}), "
                             f"got {tuple(x.shape)}")

    def _queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """eqs. (1)-(10) and (12)-(14): the scaled queries q / d^(C + s) and the keys, (B, n, C, d),
        in float32 (float64 stays float64) whatever the autocast, and the values (B, n, C, r): in
        the autocast dtype under autocast (bf16 values cost nothing in the scores' accuracy), else
        in the queries' dtype."""
        self._check_input(x)
        p = self.pool_size
        q = box_mean(x, p)                                                   # (B, C, H, W)  eq. (1)
        k = max_pool_same(x, p)                                              # (B, C, H, W)  eq. (2)
        v = box_mean(self.value_conv(x), 3)                                  # (B, C, H, W)  eq. (3)
        # Scores reach 1e2-1e4 on the raw (pre-activation) stream and their softmax is sharp: in
        # bfloat16 (8-bit mantissa) they blew up and training diverged (NaN), so eqs. (7)-(16) run
        # in float32 even under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(self.qk_weight.dtype, torch.float32)  # float64 stays float64
            b, c, n = x.shape[0], self.channels, self.heads
            # eqs. (7)-(10), Q and K in one product (they share W_qk): heads first, (n, 2, B, C, r).
            qk = torch.stack((self._split_heads(q).transpose(0, 1), self._split_heads(k).transpose(0, 1)), dim=1)
            qk = torch.baddbmm(self.qk_bias.to(dtype).unsqueeze(1), qk.to(dtype).reshape(n, 2 * b * c, -1),
                               self.qk_weight.to(dtype))                   # (n, 2BC, d)
            qk = qk.reshape(n, 2, b, c, self.embed_dim).permute(1, 2, 0, 3, 4)  # (2, B, n, C, d)
            q, k = qk.unbind(0)                                              # (B, n, C, d)  eqs. (7)-(10)
            # eq. (12) m_i = mean_j S_ij = q_i . mean_j k_j (S is linear in k): a (C, d) product, not a
            # mean over the (C, C) scores, which dominate the block's cost on deep, wide maps.
            m = (q @ k.mean(dim=-2).unsqueeze(-1)).squeeze(-1)               # (B, n, C)     eq. (12)
            s = torch.sigmoid(self.scale_fc(m.to(self.scale_fc.weight.dtype))).to(dtype)  # (B, n, C)  eq. (13)
            # eq. (14): N = S / d^(C + s), one divisor per query channel (row of S), applied to q before
            # eq. (11)'s product: N = (q / d^(C + s)) k^T, so no elementwise pass over the (C, C) scores.
            divisor = torch.exp((self.scale_c + s) * math.log(self.embed_dim)).unsqueeze(-1)  # (B, n, C, 1)
            v = self._split_heads(v)                                         # (B, n, C, r)
            return q / divisor, k, v if v.dtype in _HALF_DTYPES else v.to(dtype)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map A of eq. (15), shape (B, n, C, C); rows sum to 1."""
        q, k, _ = self._queries_keys_values(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.softmax(q @ k.transpose(-1, -2), dim=-1)           # (B, n, C, C)  eqs. (11), (15)

    def head_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's output O_i = A_i V_i of eq. (16), shape (B, n, C, r): float32 (float64 for a
        float64 block), or the autocast dtype under autocast (the map A itself stays float32)."""
        q, k, v = self._queries_keys_values(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return channel_attention(q, k, v)                                # (B, n, C, r)  eqs. (11), (15), (16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head_outputs(x).to(x.dtype)                               # (B, n, C, r)  eqs. (1)-(16)
        if self.gate is not None:
            out = (1 + torch.tanh(self.gate)) * out                          # LHC-NetC controller
        if self.layer_scale is not None:
            out = out * self.layer_scale.to(out.dtype).view(-1, 1)           # (B, n, C, r)  gamma per channel
        # eq. (17) and the residual sum, read straight from the heads' layout into x's layout.
        b, c, h, w = x.shape
        if _is_channels_last(x):
            y = x.permute(0, 2, 3, 1).reshape(b, self.heads, self.head_len, c) + out.transpose(2, 3)
            return y.reshape(b, h, w, c).permute(0, 3, 1, 2)                 # (B, C, H, W) channels-last
        return (x.reshape(b, c, self.heads, self.head_len) + out.transpose(1, 2)).reshape(b, c, h, w)
