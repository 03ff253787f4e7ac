"""daformer_fast: a fast, faithful DAFormer trainer (domain-adaptive semantic segmentation) in modern PyTorch."""

__version__ = "0.1.0"
