"""The deployment's model fingerprint, computed the same way by every process from what its command line names
(preset, checkpoint, seed, the weight options --load-format/--dtype/--num-layers): workers stamp it on registrations,
tickets and states; the router computes its own and refuses any worker that registers with another (or none)
instead of trusting the first to arrive.

In the torch-free floor (docs/DESIGN.md §2), beside the model's configuration it reads (the presets, a checkpoint's
config.json, the load options; no torch, no weights), so that the router computes it itself and starts without torch.
"""

from __future__ import annotations

from sparsepd.proto.transfer import model_fingerprint


def deployment_fingerprint(preset: str, checkpoint: str | None, seed: int, load_format: str = "auto",
                           dtype: str = "auto", num_layers: int | None = None) -> str:
    """sha256 (16 hex digits) of the model config (a checkpoint's config.json when it has one, else the preset,
    with the load options applied: depth, weight format) and the weights' identity (seed, checkpoint path, load
    format): `proto.transfer.model_fingerprint`."""
    from sparsepd.load_options import LoadOptions, resolve_model_config

    options = LoadOptions(load_format=load_format, dtype=dtype, num_layers=num_layers)
    cfg = resolve_model_config(preset, checkpoint, options)
    dummy = ";load_format=dummy" if load_format == "dummy" else ""  # other weights than the host's random ones
    return model_fingerprint(cfg, extra=f"seed={seed};checkpoint={checkpoint}{dummy}")
