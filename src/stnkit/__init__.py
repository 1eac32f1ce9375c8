"""stnkit: spatial transformer networks for PyTorch."""
__version__ = "0.1.0"
