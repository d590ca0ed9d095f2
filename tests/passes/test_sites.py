import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompile.config import OpKind
from qcompile.passes.decompose import decompose_fused_attention
from qcompile.passes.sites import find_sites, qualified_name
from tests.toy_models import ComputedWeightToy, ConvTransformerToy


def capture(model, *args):
    """Sites of each captured graph (found inside the backend: Dynamo drops its source metadata after)."""
    found = []

    def backend(gm, example_inputs):
        found.append(find_sites(decompose_fused_attention(gm), example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(*args)
    return found


def test_qualified_name_from_dynamo_source():
    assert qualified_name("L['self']._modules['enc']._modules['0']._parameters['weight']") == "enc.0.weight"
    assert qualified_name("L['self']._modules['attn']._parameters['in_proj_weight']") == "attn.in_proj_weight"
    src = "L['self'].__dict__['_modules']['time_embedding']._modules['linear_1']._parameters['weight']"
    assert qualified_name(src) == "time_embedding.linear_1.weight"
    assert qualified_name("L['self'].__dict__['_parameters']['scale_shift_table']") == "scale_shift_table"


def test_finds_every_linear_and_conv_by_what_the_graph_computes():
    m = ConvTransformerToy().eval()
    sites, = capture(m, torch.randn(2, 1, 16, 16), torch.rand(2))
    assert [(s.key, s.kind) for s in sites] == [
        ("patch", OpKind.CONV),
        ("enc.self_attn.in_proj", OpKind.LINEAR),
        ("enc.self_attn.out_proj", OpKind.LINEAR),
        ("enc.linear1", OpKind.LINEAR),
        ("enc.linear2", OpKind.LINEAR),
        ("head", OpKind.LINEAR),
        ("unpatch", OpKind.CONV_TRANSPOSE),
    ]
    assert sites[1].weight_shape == (96, 32)
    assert sites[0].conv_args["stride"] == (4, 4)
    assert all(s.unsupported is None for s in sites)


def test_functional_linear_with_parameter_is_found_and_computed_weight_is_refused():
    sites, = capture(ComputedWeightToy(), torch.randn(2, 16), torch.rand(2))
    assert len(sites) == 2
    assert "computed in the graph" in sites[0].unsupported
    assert sites[1].key == "lin" and sites[1].unsupported is None


def test_weight_used_twice_gets_distinct_keys():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(self.lin(x))

    sites, = capture(Twice(), torch.randn(2, 8))
    assert [s.key for s in sites] == ["lin", "lin#1"]


def test_functional_conv_transpose_and_conv1d():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(4, 2, 3))
            self.c = nn.Conv1d(4, 4, 1)

        def forward(self, x):
            return self.c(F.conv1d(x, self.w1, padding=1))

    sites, = capture(Fn(), torch.randn(1, 2, 9))
    assert [(s.key, s.kind, s.conv_args["padding"]) for s in sites] == [("w1", OpKind.CONV, 1), ("c", OpKind.CONV, (0,))]
