"""Expert gradients in bf16 (moe/experts.py): fp32 accumulation where many rows meet.

Bound (stated once, used below):
  GRAD_RTOL      relative L2 error of a bf16 layer's parameter gradients against float64 when
                 thousands of rows feed one expert's bias / LayerNorm affine (bf16 keeps 8 bits:
                 one rounding is 2^-9 relative; a few roundings per path stay well under 3e-2)
"""

import pytest
import torch

from moe.experts import ConvExperts, FFNExperts, ResidualMLPExperts

GRAD_RTOL = 3e-2


def _experts(kind, impl, e, c, f):
    if kind == "seed":
        return ResidualMLPExperts(e, c, f, dropout=0.0, impl=impl)
    return (FFNExperts if kind == "ffn" else ConvExperts)(e, c, f, impl=impl)


@pytest.mark.parametrize("kind,impl", [("seed", "bmm"), ("seed", "grouped_mm"), ("ffn", "bmm"), ("ffn", "fused"),
                                       ("ffn", "grouped_mm"), ("conv", "bmm")])
def test_bf16_expert_gradients_with_thousands_of_rows_per_expert(kind, impl):
    torch.manual_seed(0)
    e, c, f = 2, 16, 32
    l = 4 if kind == "conv" else 1  # conv experts need whole 2x2 patches
    units = 8192 // l
    counts = torch.tensor([units - 16, 16])
    x = torch.randn(units, l, c)
    g = 1 + 0.1 * torch.randn(units, l, c)  # same-signed: the sums grow large, as bias gradients do
    ref = _experts(kind, impl if impl != "grouped_mm" else "bmm", e, c, f).double()
    (ref(x.double(), counts) * g.double()).sum().backward()
    low = _experts(kind, impl, e, c, f)
    low.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    low = low.bfloat16()
    (low(x.bfloat16(), counts).float() * g).sum().backward()
    for (name, p_ref), p_low in zip(ref.named_parameters(), low.parameters()):
        assert p_low.grad.dtype == torch.bfloat16
        err = float((p_low.grad.double() - p_ref.grad).norm() / p_ref.grad.norm())
        assert err < GRAD_RTOL, (kind, impl, name, err)
