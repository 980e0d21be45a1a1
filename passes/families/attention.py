"""The attention family (causal, sliding-window, strided and block masks): declared, not yet
implemented. A Config naming one of its patterns is refused at compile time with an error that says
so, instead of being silently ignored."""
from sparsify.family import Family, register_family
from sparsify.patterns import BlockMask, Causal, SlidingWindow, Strided


class AttentionFamily(Family):
    name = "attention"
    field = "attention"
    patterns = (Causal, SlidingWindow, Strided, BlockMask)
    supported = False


register_family(AttentionFamily())
