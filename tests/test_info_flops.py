"""``lhcnet info``'s FLOP counts (``lhcnet.summary``) against a hand count of ``lhcnet_tiny``.

Convention (torch.utils.flop_counter, and the usual one): a multiply-add is 2 FLOPs; bias adds,
normalisation, max pooling, softmax and activations are not counted. The LHC's two 'same'
average pools (eqs. 1 and 3) are depthwise 3 x 3 convolutions (``lhcnet.nn.lhc.box_mean``), so
they count like any convolution. Input 3 x 16 x 16, batch 1.
"""
from __future__ import annotations

import tiny_models  # noqa: F401  (registers lhcnet_tiny)
from lhcnet.cli import main as lhcnet_main
from lhcnet.models import create_model
from lhcnet.summary import summarize


def conv(c_in: int, c_out: int, k: int, side_out: int) -> int:
    return 2 * c_in * c_out * k * k * side_out * side_out


def lhc(c: int, side: int, heads: int, d: int, k: int = 3) -> int:
    """One LHC block (spec eqs. 1-17) on a (c, side, side) map; r = side / heads rows x side."""
    r = side // heads * side
    box_mean = 2 * c * 3 * 3 * side * side  # a depthwise 3 x 3 convolution
    return (box_mean                        # eq. (1): Q = the average pool of x
            + conv(c, c, k, side) + box_mean  # eq. (3): V = the average pool of a convolution
            + 2 * heads * (2 * c) * r * d   # eqs. (7)-(10): Q and K through W_qk in one product
            + 2 * heads * c * d             # eq. (12): m = q . mean(k)
            + 2 * heads * c * c             # eq. (13): the scale's dense layer, one per head
            + 2 * heads * c * c * d         # eq. (11): the scores q k^T
            + 2 * heads * c * c * r)        # eq. (16): A V


BACKBONE = (conv(3, 8, 3, 16)                                     # stem conv0, 16 x 16
            + conv(8, 8, 3, 8) + conv(8, 8, 3, 8) + conv(8, 8, 1, 8)  # stage1 (after the 2x max pool)
            + conv(8, 16, 3, 4) + conv(16, 16, 3, 4) + conv(8, 16, 1, 4)  # stage2, stride 2
            + 2 * 16 * 16 + 2 * 16 * 7)                           # head: fc1, logits
BLOCKS = {"stem": lhc(8, 8, heads=2, d=8), "stage2": lhc(16, 4, heads=1, d=8)}


def test_flops_match_a_hand_count() -> None:
    assert BACKBONE == 381_664 and BLOCKS == {"stem": 119_296, "stage2": 104_192}  # the arithmetic above
    assert summarize(create_model("tiny")).flops == BACKBONE
    summary = summarize(create_model("lhcnet_tiny"))
    assert {b.place: b.flops for b in summary.blocks} == BLOCKS
    assert summary.flops == BACKBONE + sum(BLOCKS.values())


def test_info_prints_the_counts(capsys) -> None:
    assert lhcnet_main(["info", "lhcnet_tiny"]) == 0
    out = capsys.readouterr().out
    assert f"forward FLOPs (batch 1): {(BACKBONE + sum(BLOCKS.values())) / 1e9:.3f} G" in out
