"""The generated CPU attention kernel (attention_cpu) against a float64 reference: odd query and key
counts around its 8-row and 32-key blocks, head sizes, fp32 and bool masks broadcast over any
leading dim (with -inf / false entries and a row that attends to nothing), causal, a given scale,
q/k/v as strided views of a packed projection, poisoned outputs; its refusals."""
import zlib

import pytest
import torch
import torch.nn.functional as F

from kernel_utils import poison
from sparsify.codegen.kernels import attention_cpu

pytestmark = pytest.mark.skipif(attention_cpu.unsupported() is not None, reason=f"{attention_cpu.unsupported()}")


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _qkv(b, h, s, L, d, gen, packed=False):
    if packed:   # the heads of one [B, S, 3 * H * D] projection, as HF attention makes them
        qkv = torch.randn(b, s, 3 * h * d, generator=gen)
        return [t.view(b, s, h, d).transpose(1, 2) for t in qkv.split(h * d, -1)]
    return (torch.randn(b, h, s, d, generator=gen), torch.randn(b, h, L, d, generator=gen),
            torch.randn(b, h, L, d, generator=gen))


def _check(q, k, v, mask=None, is_causal=False, scale=None):
    out = poison(torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])).transpose(1, 2)
    got = attention_cpu.attention_cpu_host(q, k, v, mask, is_causal, scale, out=out)
    assert got is out
    m = mask.double() if mask is not None and mask.dtype == torch.float32 else mask
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m, is_causal=is_causal,
                                         scale=scale)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-6)
    return got


@pytest.mark.parametrize("s,L", [(1, 1), (7, 7), (8, 33), (37, 41), (128, 128), (9, 64)])
@pytest.mark.parametrize("d", (32, 64, 96))
def test_token_counts_and_head_sizes(s, L, d, gen):
    _check(*_qkv(2, 3, s, L, d, gen))


@pytest.mark.parametrize("shape", [(2, 1, 1, 41), (1, 3, 37, 41), (2, 3, 37, 41), (37, 41)])
def test_float_masks_broadcast_and_minus_infinity(shape, gen):
    q, k, v = _qkv(2, 3, 37, 41, 64, gen)
    mask = torch.randn(shape, generator=gen)
    mask[..., 3] = -float("inf")
    mask[..., 5] = torch.finfo(torch.float32).min          # what HF builds for padding
    _check(q, k, v, mask)


def test_bool_masks_and_a_row_that_attends_to_nothing(gen):
    q, k, v = _qkv(2, 3, 37, 41, 32, gen)
    mask = torch.rand(2, 1, 37, 41, generator=gen) > 0.3
    mask[0, 0, 5] = False
    got = _check(q, k, v, mask)
    assert torch.equal(got[0, :, 5], torch.zeros_like(got[0, :, 5]))


@pytest.mark.parametrize("s,L", [(37, 37), (9, 41), (41, 9)])
def test_causal_is_top_left_aligned_as_torch(s, L, gen):
    _check(*_qkv(1, 2, s, L, 64, gen), is_causal=True)


def test_packed_projection_views_and_a_given_scale(gen):
    _check(*_qkv(3, 4, 29, 29, 64, gen, packed=True), mask=torch.zeros(3, 1, 1, 29), scale=0.3)


def test_refusals_name_the_argument(gen):
    q, k, v = _qkv(1, 2, 9, 9, 64, gen)
    with pytest.raises(ValueError, match="multiple of 32"):
        attention_cpu.attention_cpu_host(*_qkv(1, 2, 9, 9, 48, gen))
    with pytest.raises(TypeError, match="float32"):
        attention_cpu.attention_cpu_host(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="grouped-query"):
        attention_cpu.attention_cpu_host(q, k[:, :1], v[:, :1])
    with pytest.raises(TypeError, match="attn_mask"):
        attention_cpu.attention_cpu_host(q, k, v, torch.zeros(9, 9, dtype=torch.float16))
    with pytest.raises(ValueError, match="broadcast"):
        attention_cpu.attention_cpu_host(q, k, v, torch.zeros(9, 8))
    with pytest.raises(ValueError, match="is_causal"):
        attention_cpu.attention_cpu_host(q, k, v, torch.zeros(9, 9), True)
    with pytest.raises(ValueError, match="out"):
        attention_cpu.attention_cpu_host(q, k, v, out=torch.empty(1, 2, 9, 63))
