"""Channel provenance on real Dynamo graphs: the shared MNIST UNet, a tiny diffusers UNet2DModel,
and a synthetic model with one branch per accepted / refused pattern."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompile.graph import prepare
from qcompile.passes.provenance import SPLIT_KEY, find_splits


def capture(model, *args, **kwargs):
    """Run ``model`` once through Dynamo and return the split decisions of its graphs, by key."""
    decisions = {}

    def backend(gm, example_inputs):
        gm, _ = prepare(gm, example_inputs)
        for d in find_splits(gm):
            node = next(n for n in gm.graph.nodes if n.name == d.node)
            assert node.meta[SPLIT_KEY] is d
            decisions[d.key] = d
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    return decisions


def test_shared_mnist_unet_splits_layernorm_conv_and_residual_conv(shared_models):
    from qcompile.zoo import load_mnist_unet

    d = capture(load_mnist_unet(), torch.randn(2, 1, 28, 28), torch.randint(0, 1000, (2, 1)))
    expected = {}
    for i, c in enumerate((40, 20, 10)):
        expected[f"decoders.{i}.0.conv1"] = (0, c, 2 * c)  # cat -> + time embedding -> LayerNorm -> conv
        expected[f"decoders.{i}.0.residual_conv"] = (0, c, 2 * c)  # cat -> + time embedding -> 1x1 conv
    assert {k: v.points for k, v in d.items()} == expected
    assert [p.split("(")[0] for p in d["decoders.0.0.conv1"].path] == ["add", "layer_norm"]


def test_tiny_diffusers_unet_splits_where_groups_align_and_refuses_where_they_straddle():
    from tests.tiny_models import tiny_unet2d

    case = tiny_unet2d()
    d = capture(case.model, *case.args, **case.kwargs)
    # cat(64, 64) with 8 groups of 16: GroupNorm -> SiLU -> conv1 and the conv_shortcut both split
    assert d["up_blocks.0.resnets.0.conv1"].points == (0, 64, 128)
    assert [p.split("(")[0] for p in d["up_blocks.0.resnets.0.conv1"].path] == ["group_norm", "silu"]
    assert d["up_blocks.0.resnets.0.conv_shortcut"].points == (0, 64, 128)
    # cat(64, 32): groups of 12 straddle channel 64, but the shortcut reads the cat directly
    refused = d["up_blocks.0.resnets.1.conv1"]
    assert refused.points is None and "groups of 12 channels straddling the split at 64" in refused.reason
    assert "not split: group_norm" in refused.describe()
    assert d["up_blocks.0.resnets.1.conv_shortcut"].points == (0, 64, 96)
    # the sinusoidal embedding: cat(cos, sin) (flip_sin_to_cos re-concatenates the halves) -> linear
    assert d["time_embedding.linear_1"].points == (0, 16, 32)
    # ops after a conv have no provenance: no decision at all
    assert "up_blocks.0.resnets.0.conv2" not in d and "conv_out" not in d


class Branches(nn.Module):
    """One branch per pattern; every branch starts from the same cat of 3 + 5 channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 5, 1)
        self.temb = nn.Linear(4, 8)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        convs = ["ok_affine", "ok_pad", "ok_same_cat", "conv_first", "conv_second", "bad_add", "bad_slice",
                 "bad_pad", "bad_groups", "bad_unknown"]
        for name in convs:
            cin = 4 if name == "bad_slice" else 8
            setattr(self, name, nn.Conv2d(cin, 4, 3, padding=1))
        self.conv_second = nn.Conv2d(4, 4, 1)
        self.bad_pad = nn.Conv2d(10, 4, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.ok_last = nn.Linear(8, 4)
        self.bad_merge = nn.Linear(8 * 4 * 4, 4)
        self.other = nn.Conv2d(2, 8, 1)

    def forward(self, x, t):
        h = torch.cat((self.a(x), self.b(x)), dim=1)  # (B, 8, 4, 4), split at 3
        e = self.temb(t)[:, :, None, None]
        outs = [
            self.ok_affine(F.gelu(h + e) * self.scale),  # time embedding add, activation, per-channel affine
            self.ok_pad(F.pad(h, (1, 1, 1, 1))[:, :, 1:-1, 1:-1]),  # spatial padding and spatial slicing
            self.ok_same_cat(F.silu(h) + h),  # both operands come from the same split
            self.conv_second(self.conv_first(h)),  # a conv ends provenance
            self.bad_add(h + self.other(x)),  # a full tensor of other provenance
            self.bad_slice(h[:, 2:6]),  # slicing across the boundary
            self.bad_pad(F.pad(h, (0, 0, 0, 0, 1, 1))),  # padding the channel dim
            self.bad_groups(F.group_norm(h, 4)),  # groups of 2 straddle channel 3
            self.bad_unknown(torch.cumsum(h, dim=1)),  # an op that mixes channels
        ]
        outs.append(self.depthwise(h))  # grouped convolution
        outs.append(self.ok_last(F.layer_norm(h.permute(0, 2, 3, 1), (8,))).permute(0, 3, 1, 2))  # channels-last linear
        outs.append(self.bad_merge(h.flatten(1))[:, :, None, None])  # the channel dim merged into the features
        return sum(o.sum() for o in outs)


def test_synthetic_branches_accept_and_refuse_with_reasons():
    torch.manual_seed(0)
    d = capture(Branches().eval(), torch.randn(2, 2, 4, 4), torch.randn(2, 4))
    for key in ("ok_affine", "ok_pad", "ok_same_cat", "conv_first", "ok_last"):
        assert d[key].points == (0, 3, 8), (key, d[key].describe())
    assert "conv_second" not in d  # its input is a conv's output
    reasons = {
        "bad_add": "a full tensor of other provenance",
        "bad_slice": "slices the split dim",
        "bad_pad": "pads the split dim",
        "bad_groups": "straddling the split at 3",
        "bad_unknown": "is not known to keep channels in place",
        "depthwise": "grouped convolution (groups=8)",
        "bad_merge": "merges or splits the split dim",
    }
    for key, reason in reasons.items():
        assert d[key].points is None and reason in d[key].reason, (key, d[key].describe())


def test_nested_cats_and_aligned_groups():
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 4, 1), nn.Conv2d(1, 2, 1)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            h = torch.cat((torch.cat((self.a(x), self.b(x)), 1), self.c(x)), 1)
            return self.out(F.silu(F.group_norm(h, 4)))  # groups of 2 align with 0|2|6|8

    d = capture(Nested().eval(), torch.randn(1, 1, 3, 3))
    assert d["out"].points == (0, 2, 6, 8)
