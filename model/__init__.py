"""The DeepSeek-V4 network in plain PyTorch: config presets, modules, weights, tokenizer."""
