"""genaccel: fast, honest sampling for LlamaGen-class autoregressive image generators."""

__version__ = "0.1.0"
