"""domadapt: domain adaptation with Batch-Instance Normalization (BIN) and DANN."""

__version__ = "0.1.0"
