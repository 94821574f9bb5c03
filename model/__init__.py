"""The DeepSeek-V4 network in plain PyTorch: modules, weights, tokenizer (its configuration is the floor's,
sparsepd/model_config.py)."""
