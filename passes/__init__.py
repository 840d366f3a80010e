"""Graph passes. Installed as ``bqc.passes``."""
