"""bqc: a compiler that makes diffusion UNets binary."""
__version__ = "0.1.0"
