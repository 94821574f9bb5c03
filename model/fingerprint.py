"""The deployment's model fingerprint, computed the same way by every process from what its command line names
(preset, checkpoint, seed): workers stamp it on registrations, tickets and states; the router gets its own
and refuses any worker that registers with another (or none) instead of trusting the first to arrive.

The router may not import the model package (docs/DESIGN.md §2): the deploy layer computes the router's
fingerprint and hands it over. This reads the model's config only (pydantic presets and a checkpoint's
config.json; no torch, no weights), so that a router process starts without torch.
"""

from __future__ import annotations

from sparsepd.model.checkpoint_config import read_checkpoint_config
from sparsepd.model.config import get_preset
from sparsepd.proto.transfer import model_fingerprint


def deployment_fingerprint(preset: str, checkpoint: str | None, seed: int) -> str:
    """sha256 (16 hex digits) of the model config (a checkpoint's config.json when it has one, else the preset)
    and the weights' identity (seed, checkpoint path): `proto.transfer.model_fingerprint`."""
    cfg = (read_checkpoint_config(checkpoint) if checkpoint else None) or get_preset(preset)
    return model_fingerprint(cfg, extra=f"seed={seed};checkpoint={checkpoint}")
