"""sparsepd: prefill/decode disaggregated serving for DeepSeek-V4-style models."""

__version__ = "0.1.0"
