"""GlobScope core: a global view of neural-network loss landscapes, importable without ParaView.

The folders are the layers; each imports only from its own layer or below (tests/test_layers.py):

- ``cli``: the ``globscope`` command, one module per subcommand
- ``stages``: one driver per command (train, import_, fit, landscape, topology, connect, align, render)
- algorithms: ``reducers`` (autoencoder and baselines), ``topology`` (merge trees in TTK's layout; numpy only,
  also imported by ParaView's own Python), ``alignment`` (permutation symmetry), ``connectivity`` (mode
  connectivity curves), ``networks`` (models, data sets, devices), ``evaluation`` (one model, many models, paths)
- ``storage``: study.h5, atomic writes, VTK files, the names of a study's files
- ``errors`` and ``resources`` (memory estimates): the base every layer may use
"""
from .errors import GlobScopeError

__version__ = "0.1.0"
__all__ = ["GlobScopeError", "__version__"]
