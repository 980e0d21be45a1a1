"""The spatial family (spatially sparse convolution on active sites, as in SparK): declared, not yet
implemented. A Config naming Submanifold is refused at compile time with an error that says so,
instead of being silently ignored."""
from sparsify.family import Family, register_family
from sparsify.patterns import Submanifold


class SpatialFamily(Family):
    name = "spatial"
    field = "spatial"
    patterns = (Submanifold,)
    supported = False


register_family(SpatialFamily())
