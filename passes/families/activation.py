"""The activation family (FFN activation sparsity: ReLU zeros, thresholds, top-k): declared, not yet
implemented. A Config naming ActivationThreshold or TopK is refused at compile time with an error
that says so, instead of being silently ignored."""
from sparsify.family import Family, register_family
from sparsify.patterns import ActivationThreshold, TopK


class ActivationFamily(Family):
    name = "activation"
    field = "activation"
    patterns = (ActivationThreshold, TopK)
    supported = False


register_family(ActivationFamily())
