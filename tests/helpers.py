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


def fake_compare(ms_of, run=False):
    """A stand-in for CostModel.compare: `ms_of(key)` gives each entry's time (the key's parts after
    the device, torch version and timing method are the caller's: part 3 is the kernel name or
    "dense"); ratios are against the first entry, every one stable. run=True still calls each
    function once (a candidate's output is checked against dense before timing)."""
    from sparsify.timing import Timed

    def compare(self, entries, threshold=None):
        if run:
            for _, fn in entries:
                fn()
        ms = [ms_of(k) for k, _ in entries]
        return [Timed(m, ms[0] / m) for m in ms]
    return compare


def by_kernel(table, others_ms=1000.0):
    """ms_of for fake_compare from {kernel name or "dense": ms}. A kernel the table does not name
    (another device implementation that is a candidate here too, such as csr_cpu) is timed at
    `others_ms`, far slower than any entry, so the test decides between the kernels it names."""
    return lambda key: table.get(key.split("|")[3], others_ms)
