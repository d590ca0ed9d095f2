"""Probe (not a test): how Dynamo handles nn.TransformerEncoderLayer's eval fast path on this torch."""
import torch
from tests.toy_models import ConvTransformerToy

graphs = []
def backend(gm, ex):
    graphs.append(sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function" and ("linear" in str(n.target) or "transformer" in str(n.target))}))
    return gm.forward

for fast in (True, False):
    torch._dynamo.reset(); graphs.clear()
    torch.backends.mha.set_fastpath_enabled(fast)
    m = ConvTransformerToy().eval()
    with torch.no_grad():
        torch.compile(m, backend=backend)(torch.randn(2, 1, 16, 16), torch.rand(2))
        expl = torch._dynamo.explain(m)(torch.randn(2, 1, 16, 16), torch.rand(2))
    print(torch.__version__, "fastpath", fast, "graphs", len(graphs), graphs, "breaks", [str(b.reason)[:200] for b in expl.break_reasons])
