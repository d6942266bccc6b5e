"""Mode connectivity: low-loss curves between two minima (Garipov et al. 2018)."""
