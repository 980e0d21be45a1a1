"""Small models shared by the spine tests."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """Linear -> relu -> Linear + residual: exercises epilogue fusion (activation and residual)."""

    def __init__(self, d=48, h=96, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.out = nn.Linear(d, 8)

    def forward(self, x):
        y = self.fc2(F.relu(self.fc1(x))) + x
        return self.out(y)


def mlp_input(batch=5, d=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d, generator=g)


def kernel_device() -> str:
    """Where forced Triton kernels run: the GPU if there is one, else the CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
