"""The LHC module against a slow reference written straight from the paper's equations."""
from __future__ import annotations

import math

import pytest
import torch

from lhcnet import LHC


def reference_lhc(x: torch.Tensor, m: LHC) -> torch.Tensor:
    """Eqs. (1)-(17) with explicit loops over images, heads, channels and pixels (float64)."""
    B, C, H, W = x.shape
    n, d, p = m.heads, m.embed_dim, m.pool_size
    rows = H // n
    wq = m.qk_weight.detach().double()
    bq = m.qk_bias.detach().double()
    wp = m.scale_fc.weight.detach().double()
    bp = m.scale_fc.bias.detach().double()
    conv = m.value_conv.weight.detach().double()
    conv_b = m.value_conv.bias.detach().double()
    k_size = m.kernel_size

    def window(img: torch.Tensor, i: int, j: int, size: int) -> list[float]:
        """Values of the size x size window centred at (i, j), padding cells left out."""
        h = size // 2
        return [img[a, b].item() for a in range(i - h, i + h + 1) for b in range(j - h, j + h + 1)
                if 0 <= a < H and 0 <= b < W]

    out = torch.zeros_like(x)
    for b in range(B):
        xb = x[b]
        q0 = torch.zeros(C, H, W, dtype=torch.float64)
        k0 = torch.zeros_like(q0)
        conv_out = torch.zeros_like(q0)
        padded = torch.nn.functional.pad(xb, [k_size // 2] * 4)
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    vals = window(xb[c], i, j, p)
                    q0[c, i, j] = sum(vals) / len(vals)          # (1) avg-pool, no padding counted
                    k0[c, i, j] = max(vals)                      # (2) max-pool
                    patch = padded[:, i:i + k_size, j:j + k_size]
                    conv_out[c, i, j] = (patch * conv[c]).sum() + conv_b[c]
        v0 = torch.zeros_like(q0)
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    vals = window(conv_out[c], i, j, 3)
                    v0[c, i, j] = sum(vals) / len(vals)          # (3) conv then fixed 3x3 avg-pool
        for h in range(n):
            band = slice(h * rows, (h + 1) * rows)               # (4)-(6) head h: whole rows
            qh = q0[:, band, :].reshape(C, -1)
            kh = k0[:, band, :].reshape(C, -1)
            vh = v0[:, band, :].reshape(C, -1)
            qe = qh @ wq[h] + bq[h]                              # (7)-(10) shared Q/K embedding
            ke = kh @ wq[h] + bq[h]
            s_mat = torch.zeros(C, C, dtype=torch.float64)
            for i in range(C):
                for j in range(C):
                    s_mat[i, j] = (qe[i] * ke[j]).sum()          # (11)
            mean = s_mat.mean(dim=1)                             # (12)
            for i in range(C):
                s_i = 1 / (1 + math.exp(-((wp[i] * mean).sum() + bp[i]).item()))  # (13)
                row = s_mat[i] / d ** (m.scale_c + s_i)          # (14)
                a_row = torch.exp(row - row.max())
                a_row = a_row / a_row.sum()                      # (15)
                o_row = (a_row[:, None] * vh).sum(dim=0)         # (16)
                gain = 1.0 if m.gate is None else 1 + math.tanh(m.gate.item())
                out[b, i, band, :] = xb[i, band, :] + gain * o_row.reshape(rows, W)  # (17)
    return out


def randomise(m: LHC, seed: int) -> None:
    """Random weights everywhere (biases included), so no term of the equations hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in m.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.3)


@pytest.mark.parametrize("settings", [
    dict(channels=5, resolution=6, heads=3, embed_dim=4),
    dict(channels=4, resolution=(4, 5), heads=2, embed_dim=3, pool_size=5, kernel_size=1, scale_c=0.5),
    dict(channels=3, resolution=5, heads=1, embed_dim=7, gate_init=-0.5),
])
def test_matches_slow_reference(settings: dict) -> None:
    m = LHC(**settings).double()
    randomise(m, seed=1)
    h, w = m.height, m.width
    x = torch.randn(2, m.channels, h, w, dtype=torch.float64) * 2
    fast = m(x)
    slow = reference_lhc(x, m)
    assert fast.shape == x.shape
    assert (fast - slow).abs().max().item() <= 1e-9


def test_gradients_reach_every_parameter() -> None:
    m = LHC(8, 8, heads=4, embed_dim=6, gate_init=0.0)
    x = torch.randn(3, 8, 8, 8, requires_grad=True)
    m(x).square().sum().backward()
    for name, param in m.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_divisor_lies_between_d_pow_c_and_d_pow_c_plus_1() -> None:
    m = LHC(6, 6, heads=2, embed_dim=9, scale_c=1.0)
    randomise(m, seed=3)
    captured = {}
    m.scale_fc.register_forward_hook(lambda mod, inp, out: captured.setdefault("s", torch.sigmoid(out)))
    m(torch.randn(4, 6, 6, 6) * 10)
    divisor = 9.0 ** (m.scale_c + captured["s"])
    assert divisor.min() >= 9.0 ** 1 and divisor.max() <= 9.0 ** 2
    assert divisor.std() > 0  # dynamic: not a constant


def test_attention_rows_are_distributions_over_key_channels() -> None:
    m = LHC(7, 4, heads=2, embed_dim=3)
    attn = m.attention(torch.randn(2, 7, 4, 4))
    assert attn.shape == (2, 2, 7, 7)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 7))


def test_heads_are_horizontal_bands() -> None:
    """Changing the bottom rows must not change what the top head's attention sees."""
    m = LHC(4, 6, heads=3, embed_dim=5)
    m.eval()
    x = torch.randn(1, 4, 6, 6)
    y = x.clone()
    y[:, :, 5:, :] += 3.0  # last row only: inside head 3, and within pooling reach of no other head
    a, b = m.attention(x), m.attention(y)
    torch.testing.assert_close(a[:, 0], b[:, 0])  # head 1 (rows 0-1) untouched
    assert not torch.allclose(a[:, 2], b[:, 2])


def test_same_shape_out_and_residual_identity_when_values_are_zero() -> None:
    m = LHC(3, (4, 6), heads=4, embed_dim=2)
    with torch.no_grad():
        m.value_conv.weight.zero_()
        m.value_conv.bias.zero_()
    x = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(m(x), x)


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=8, resolution=10, heads=3, embed_dim=4), "must divide the feature-map height"),
    (dict(channels=8, resolution=10, heads=2, embed_dim=4, pool_size=2), "pool_size must be a positive odd"),
    (dict(channels=8, resolution=10, heads=2, embed_dim=4, kernel_size=0), "kernel_size must be a positive odd"),
    (dict(channels=0, resolution=10, heads=2, embed_dim=4), "channels must be a positive int"),
    (dict(channels=8, resolution=(10, 10, 3), heads=2, embed_dim=4), "resolution must be an int or an"),
    (dict(channels=8, resolution=10, heads=2, embed_dim=0), "embed_dim must be a positive int"),
])
def test_bad_settings_raise_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LHC(**kwargs)


def test_wrong_input_shape_is_reported() -> None:
    m = LHC(4, 8, heads=2, embed_dim=3)
    with pytest.raises(ValueError, match=r"expects input \(B, 4, 8, 8\), got \(1, 4, 6, 6\)"):
        m(torch.randn(1, 4, 6, 6))


def test_keras_style_initialisation() -> None:
    m = LHC(16, 8, heads=4, embed_dim=10)
    bound = math.sqrt(6 / (m.head_len + 10))
    assert m.qk_weight.abs().max() <= bound and m.qk_weight.abs().max() > 0.8 * bound
    assert m.qk_bias.abs().sum() == 0 and m.scale_fc.bias.abs().sum() == 0 and m.value_conv.bias.abs().sum() == 0


def test_attention_stays_float32_under_bf16_autocast() -> None:
    """Large raw-stream scores in bfloat16 wrecked the softmax and training diverged (NaN)."""
    torch.manual_seed(0)
    m = LHC(16, 8, heads=2, embed_dim=8)
    x = torch.randn(2, 16, 8, 8) * 30  # pre-activation stream magnitudes
    reference = m.attention(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn = m.attention(x)
        y = m(x)
    assert attn.dtype == torch.float32
    torch.testing.assert_close(attn, reference, atol=2e-2, rtol=0)
    torch.testing.assert_close(y.float(), m(x), atol=0.5, rtol=2e-2)
