"""Built-in default models for the demo and tests: a small transformer LM and a small convnet.

Random weights from a seed: nothing is downloaded.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TransformerBlock(nn.Module):
    """Pre-norm attention + FFN block of the demo LM (GELU, or ReLU: `act`)."""

    def __init__(self, d: int, heads: int, ffn: int, act: str = "gelu"):
        super().__init__()
        if act not in ("gelu", "relu"):
            raise ValueError(f"TransformerBlock: act must be 'gelu' or 'relu', got {act!r}")
        self.heads, self.act = heads, act
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.fc1(self.ln2(x))
        return self.fc2(F.relu(h) if self.act == "relu" else F.gelu(h)) + x


class TinyLM(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-norm blocks, untied LM head."""

    MAX_LEN = 256

    def __init__(self, vocab: int = 512, d: int = 256, layers: int = 2, heads: int = 4, ffn: int = 1024,
                 max_len: int = MAX_LEN, act: str = "gelu"):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList([TransformerBlock(d, heads, ffn, act) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class TinyConvNet(nn.Module):
    """A ResNet-style convnet: stem, residual conv-bn-relu stages, pooled linear classifier."""

    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                    nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc1 = nn.Linear(2 * width, 256)
        self.fc2 = nn.Linear(256, classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.stage1(x) + x)
        x = self.down(x).mean(dim=(2, 3))
        return self.fc2(F.relu(self.fc1(x)))


def tiny_lm(seed: int = 0, ffn_sparsity: float = 0.0, ffn_block: int = 64, **kw) -> TinyLM:
    """ffn_sparsity > 0 block-prunes the FFN weights (ffn_block x ffn_block blocks with the smallest
    norm zeroed), standing in for a checkpoint trained with block pruning: random weights have no
    sparsity to exploit within a small error budget."""
    torch.manual_seed(seed)
    model = TinyLM(**kw).eval()
    if ffn_sparsity:
        with torch.no_grad():
            for blk in model.blocks:
                for lin in (blk.fc1, blk.fc2):
                    w = lin.weight
                    n, k = w.shape
                    b = ffn_block
                    norms = w.view(n // b, b, k // b, b).pow(2).sum(dim=(1, 3))
                    drop = int(norms.numel() * ffn_sparsity)
                    cut = norms.flatten().kthvalue(drop).values
                    keep = (norms > cut).repeat_interleave(b, 0).repeat_interleave(b, 1)
                    w.mul_(keep)
    return model


def relu_lm(seed: int = 0, zeros: float = 0.9, d: int = 512, ffn: int = 2048, layers: int = 4, heads: int = 8,
            **kw) -> TinyLM:
    """The demo LM with ReLU FFNs whose hidden units are zero on about `zeros` of the tokens, standing
    in for a ReLU model (trained ReLU transformers and ReLU-fied LLMs have 90-97% exact zeros after
    the activation): each unit's bias is set so that its pre-activation, on the unit-variance input
    the block's LayerNorm gives, is positive with probability 1 - zeros."""
    if not 0 <= zeros < 1:
        raise ValueError(f"relu_lm: zeros must be in [0, 1), got {zeros}")
    torch.manual_seed(seed)
    model = TinyLM(d=d, ffn=ffn, layers=layers, heads=heads, act="relu", **kw).eval()
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(zeros))
    with torch.no_grad():
        for blk in model.blocks:
            blk.fc1.bias.copy_(-z * blk.fc1.weight.norm(dim=1))
    return model


def tiny_convnet(seed: int = 0, **kw) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet(**kw).eval()


def lm_inputs(batch: int = 4, seq: int = 128, vocab: int = 512, seed: int = 1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def image_inputs(batch: int = 8, size: int = 32, seed: int = 1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(device)
