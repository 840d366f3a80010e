"""Reference diffusion UNets and shipped checkpoints. Installed as ``bqc.models``."""
