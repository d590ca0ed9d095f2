"""Small denoiser-shaped modules for fast CPU tests of the graph machinery."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvTransformerToy(nn.Module):
    """conv -> stock TransformerEncoderLayer (eval fast path) -> linear -> transposed conv, timestep-scaled."""

    def __init__(self, norm_first=False, activation="gelu"):
        super().__init__()
        self.patch = nn.Conv2d(1, 32, 4, stride=4)
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, activation=activation, norm_first=norm_first)
        self.head = nn.Linear(32, 8)
        self.unpatch = nn.ConvTranspose2d(8, 1, 4, stride=4)

    def forward(self, x, t):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = self.enc(h)
        h = self.head(h) * (1 + t.reshape(-1, 1, 1))
        return self.unpatch(h.transpose(1, 2).reshape(x.shape[0], 8, x.shape[2] // 4, x.shape[3] // 4))


class GraphBreakToy(nn.Module):
    """Two linears with a graph break between them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x, timestep):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h) * timestep.reshape(-1, 1)


class ComputedWeightToy(nn.Module):
    """A linear whose weight is computed in the graph (stays float) and a normal one."""

    def __init__(self):
        super().__init__()
        self.base = nn.Parameter(torch.randn(16, 16) * 0.1)
        self.lin = nn.Linear(16, 16)

    def forward(self, x, t):
        return self.lin(F.linear(x, self.base * 2.0))


class NothingToQuantize(nn.Module):
    def forward(self, x, t):
        return torch.sin(x) * t.reshape(-1, 1)


class NanToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x, t):
        return self.b(torch.log(self.a(x) - 100.0))  # log of negatives: NaN reaches b


def run_steps(model, x, steps=6):
    """A stand-in sampling loop: `steps` denoiser calls with t from 1 down to 0."""
    out = x
    for t in torch.linspace(1, 0, steps, device=x.device, dtype=x.dtype):  # (an fp32 t would promote a bf16 model's activations)
        out = model(x, t.expand(x.shape[0]))
    return out


class TinyMLP(nn.Module):
    """Three linears in a row: the smallest model where distortions of different nodes interact."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 16)

    def forward(self, x, t):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))) * (1 + t.reshape(-1, 1))
