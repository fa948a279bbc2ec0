import torch

from extended_mind.base.rope import apply_rope, invert_rope


def test_invert_undoes_apply_with_scaling_and_partial_rotary():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 16)
    angles = torch.rand(10, 4) * 100
    for scale in (1.0, 1.3):  # YaRN multiplies cos/sin by an attention factor
        cos = torch.cat([angles.cos(), angles.cos()], -1) * scale
        sin = torch.cat([angles.sin(), angles.sin()], -1) * scale
        y = apply_rope(x, cos, sin)  # rotary on the first 8 of 16 dims
        assert torch.equal(y[..., 8:], x[..., 8:])
        assert (invert_rope(y, cos, sin) - x).abs().max() < 1e-5
