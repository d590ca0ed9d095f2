"""Convert: a quantized op's bias is folded with its bias correction into one fp32 buffer at conversion time."""

import torch

import qcompile
from qcompile.graph import prepare
from qcompile.backend import plan_annotations, plan_ops
from qcompile.lowering import reference
from qcompile.passes.annotate import annotate
from qcompile.passes.convert import convert
from qcompile.passes.sites import parameter_tensors


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16, bias=False)
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x, img):
        return self.down(torch.relu(self.up(x))), self.conv(img)


def _inputs():
    return torch.randn(4, 16), torch.randn(2, 4, 8, 8)


def _converted(model, plan, fold: bool):
    graphs = []

    def grab(gm, example_inputs):
        gm, _ = prepare(gm, example_inputs)
        annotate(gm, plan_annotations(plan, 0))
        constants = {n: v for n, (_, v) in parameter_tensors(gm, example_inputs).items()} if fold else None
        graphs.append((convert(gm, plan_ops(plan, 0), torch.device("cpu"), constants=constants), list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab)(*_inputs())
    return graphs[0]


def test_bias_and_its_correction_are_folded_into_one_fp32_buffer_with_the_same_result():
    torch.manual_seed(0)
    model = Block().eval()
    cfg = qcompile.QuantConfig.preset("w8a8-int8")
    assert cfg.bias_correction
    plan = qcompile.calibrate(model, lambda m: [m(*_inputs()) for _ in range(3)], cfg, progress=False)
    folded, inputs = _converted(model, plan, fold=True)
    unfolded, _ = _converted(model, plan, fold=False)
    calls = [n for n in folded.graph.nodes if n.target in (reference.qlinear, reference.qconv)]
    assert len(calls) == 3
    for n in calls:
        bias = n.args[3]
        assert "bias_corr" not in n.kwargs  # folded (or there was nothing to fold)
        if bias is not None:  # down has no bias but may have a correction: then the correction is the bias
            assert bias.op == "get_attr"
            value = getattr(folded, bias.target)
            assert value.dtype == torch.float32 and value.dim() == 1
    # the unfolded graph reads the biases (graph inputs) and adds the corrections per call; same numbers
    assert any("bias_corr" in n.kwargs for n in unfolded.graph.nodes if n.op == "call_function")
    for a, b in zip(folded(*inputs), unfolded(*inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the float bias parameters are no longer read by the quantized ops
    bias_inputs = [n for n in folded.graph.nodes if n.op == "placeholder" and n.name.endswith("bias_")]
    assert bias_inputs and all(not n.users for n in bias_inputs)
