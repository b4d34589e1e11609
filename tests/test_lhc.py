"""The LHC module against a slow reference written straight from the paper's equations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FER2013_CSV_GZ, requires_shared_data
from lhc_previous import previous_forward, previous_implementation
from lhcnet import LHC
from lhcnet.nn import lhc as lhc_module


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
    """Large raw-stream scores in bfloat16 wrecked the softmax and training diverged (NaN): the
    scores and the map stay float32 under autocast; only the products with the map (A v and the
    gradients) run in bf16, so outputs and gradients are the float32 ones to bf16 rounding."""
    torch.manual_seed(0)
    m = LHC(16, 8, heads=2, embed_dim=8)
    x = (torch.randn(2, 16, 8, 8) * 30).requires_grad_()  # pre-activation stream magnitudes
    weights = torch.randn(2, 16, 8, 8)
    reference, reference_heads, reference_y = m.attention(x), m.head_outputs(x), m(x)
    reference_grads = torch.autograd.grad((reference_y * weights).sum(), (x, *m.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn = m.attention(x)
        heads = m.head_outputs(x)
        y = m(x)
    assert attn.dtype == torch.float32 and heads.dtype == torch.bfloat16
    torch.testing.assert_close(attn, reference, atol=2e-2, rtol=0)
    torch.testing.assert_close(heads.float(), reference_heads, atol=0.5, rtol=2e-2)
    torch.testing.assert_close(y.float(), reference_y, atol=0.5, rtol=2e-2)
    grads = torch.autograd.grad((y.float() * weights).sum(), (x, *m.parameters()))
    for (name, _), g, ref in zip([("x", x), *m.named_parameters()], grads, reference_grads):
        assert torch.isfinite(g).all(), name
        error = (g.float() - ref).norm() / ref.norm().clamp(min=1e-6)
        assert error < 0.05, f"{name}: relative gradient error {error:.3f} under bf16 autocast"


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """eqs. (11), (15), (16) as three autograd ops."""
    return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


@pytest.mark.parametrize("chunk_bytes", [1, 10**9])  # one head per chunk; all heads in one
@pytest.mark.parametrize("store_bytes", [0, 10**9])  # maps recomputed in the backward; stored
@pytest.mark.parametrize("c, d, r, v_transposed", [(5, 4, 7, True), (20, 3, 4, True), (20, 3, 4, False)])
def test_channel_attention_forward_and_backward_match_autograd(monkeypatch, chunk_bytes: int, store_bytes: int,
                                                                c: int, d: int, r: int, v_transposed: bool) -> None:
    """The hand-written backward against autograd through the plain chain (float64), and gradcheck.
    C = 20 with d = 3, r = 4 takes the swapped products for thin outputs (``_thin``: 4 N <= C),
    into a contiguous and into a transposed (channels-last) output."""
    monkeypatch.setattr(lhc_module, "_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(lhc_module, "_STORE_BYTES", store_bytes)
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 3, c, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    if v_transposed:
        v = torch.randn(2, 3, r, c, generator=g, dtype=torch.float64).transpose(-1, -2).requires_grad_()
    else:
        v = torch.randn(2, 3, c, r, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, c, r, generator=g, dtype=torch.float64)
    fast = lhc_module.channel_attention(q, k, v)
    slow = plain_attention(q, k, v)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    grads_fast = torch.autograd.grad((fast * weights).sum(), (q, k, v))
    grads_slow = torch.autograd.grad((slow * weights).sum(), (q, k, v))
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lhc_module.channel_attention, (q, k, v))


def test_sharp_rows_give_no_denormal_weights_and_the_same_output() -> None:
    """Logit spreads of ~1e3 (trained deep blocks): the plain softmax holds weights < 1.2e-38, whose
    products are 3-10x slower on x86; the guarded one has none, and the same output to float32
    rounding (the weights it raises were below 4e-18)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 64, 3, generator=g) * 30
    k = torch.randn(4, 64, 3, generator=g) * 30
    v = torch.randn(4, 64, 6, generator=g)
    plain = torch.softmax(q @ k.transpose(1, 2), dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    assert ((plain > 0) & (plain < tiny)).any()  # the case the guard is for
    guarded = lhc_module._attention_chunk(q, k)
    assert not ((guarded > 0) & (guarded < tiny)).any() and guarded.min() > 0
    torch.testing.assert_close(guarded, plain, rtol=1e-6, atol=64 * math.exp(-40))  # rounding apart
    torch.testing.assert_close(lhc_module.channel_attention(q, k, v), plain @ v, rtol=1e-5, atol=1e-6)


def test_channels_last_input_same_numbers_and_layout_out() -> None:
    m = LHC(6, 6, heads=3, embed_dim=4, gate_init=0.3)
    randomise(m, seed=4)
    x = torch.randn(2, 6, 6, 6, requires_grad=True)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y, y_cl = m(x), m(x_cl)
    assert y.is_contiguous() and y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, rtol=1e-6, atol=1e-6)
    (y * y.detach()).sum().backward()
    (y_cl * y.detach()).sum().backward()
    torch.testing.assert_close(x_cl.grad, x.grad, rtol=1e-5, atol=1e-5)


def test_max_pool_same_equals_max_pool2d_values_and_gradients() -> None:
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    x[0, 0, :3, :3] = 1.0  # ties: the first maximal cell gets the gradient, as in F.max_pool2d
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    pooled, reference = lhc_module.max_pool_same(a, 3), F.max_pool2d(b, 3, 1, 1)
    assert torch.equal(pooled, reference) and pooled.is_contiguous()
    weights = torch.randn(reference.shape, dtype=torch.float64)
    (pooled * weights).sum().backward()
    (reference * weights).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_forward_and_gradients_equal_the_previous_implementation() -> None:
    """Against the code before the speed work (tests/lhc_previous.py), float32, gated block."""
    m = LHC(12, (6, 4), heads=3, embed_dim=5, gate_init=-0.5)
    randomise(m, seed=5)
    x = torch.randn(3, 12, 6, 4) * 5
    results = []
    for forward in (m, lambda t: previous_forward(m, t)):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = forward(xi)
        y.square().mean().backward()
        results.append([y.detach(), xi.grad] + [p.grad.clone() for p in m.parameters()])
    for new, old in zip(*results):
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5 * old.abs().max().item())


def fer2013_public_faces(count: int) -> np.ndarray:
    """The first ``count`` PublicTest faces, parsed by lhcnet.data from the shared CSV's lines."""
    import gzip

    from lhcnet.data.fer2013 import parse_fer2013_csv
    lines = []
    with gzip.open(FER2013_CSV_GZ, "rb") as f:
        header = next(f)
        for line in f:
            if line.rstrip().endswith(b"PublicTest"):
                lines.append(line)
                if len(lines) == count:
                    break
    return parse_fer2013_csv(header + b"".join(lines), str(FER2013_CSV_GZ)).images


@requires_shared_data
def test_bundled_model_logits_equal_the_previous_implementation_on_fer2013_faces() -> None:
    """The acceptance check of the speed work: 64 real faces, float32, the bundled LHC-Net."""
    from lhcnet.data import to_model_input
    from lhcnet.models import load_model
    from lhcnet.predict import bundled_model_path
    model = load_model(bundled_model_path()).float().eval()
    x = to_model_input(torch.from_numpy(fer2013_public_faces(64)), model.input_size)
    with torch.no_grad():
        new = model(x)
        with previous_implementation(model):
            old = model(x)
    assert (new - old).abs().max().item() <= 1e-4
    assert (new.argmax(1) == old.argmax(1)).all()


def test_layer_scale_zero_gradients_reach_the_scale_first_then_the_attention() -> None:
    """At gamma = 0 the block is the identity: only gamma gets a gradient at step 0 (dL/dgamma =
    sum of dL/dy * O); after one SGD step gamma != 0 and the attention's parameters learn."""
    torch.manual_seed(0)
    m = LHC(8, 8, heads=4, embed_dim=6, layer_scale_init=0.0)
    x = torch.randn(3, 8, 8, 8)
    target = torch.randn(3, 8, 8, 8)
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)
    attention_params = {name: p for name, p in m.named_parameters() if name != "layer_scale"}
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        (m(x) - target).square().mean().backward()
        if step == 0:
            assert m.layer_scale.grad.abs().min() > 0  # every channel's scale moves
            assert all(p.grad is None or p.grad.abs().max() == 0 for p in attention_params.values())
        else:
            for name, p in attention_params.items():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
    m.reset_parameters()
    assert m.layer_scale.abs().max() == 0  # de-training resets gamma to its initial value
