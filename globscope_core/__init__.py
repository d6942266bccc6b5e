"""GlobScope core: training ensembles, reducers, latent landscapes, topology.

Everything here is importable without ParaView. Modules that only need numpy
(topology, errors) are also imported by the ParaView plugin.
"""
from .errors import GlobScopeError

__version__ = "0.1.0"
__all__ = ["GlobScopeError", "__version__"]
