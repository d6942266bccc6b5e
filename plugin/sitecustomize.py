"""Loaded by every ParaView process whose PYTHONPATH holds plugin/ (pvpython, pvbatch, pvserver, MPI ranks).

ParaView 5.11's ``paraview/detail/pythonalgorithm.py`` imports ``inspect.getargspec``, which Python 3.11
removed, so no Python plugin loads without this (shared/paraview.md, trap 1). It has to run before
ParaView imports that module, on every rank, hence sitecustomize rather than code in the plugin.
"""
import inspect

if not hasattr(inspect, "getargspec"):
    inspect.getargspec = inspect.getfullargspec
