"""The model `sparsepd serve` and `sparsepd generate` run when the command line names none: the small trained
DeepSeek-V4 shipped with the package (`sparsepd/models/v4-byte-demo`: published checkpoint layout, byte-level
tokenizer, trained by tools/train_default_model.py on the Python standard library; README "Default model").

`--preset NAME` picks a preset with random weights from `--seed` (`tiny` is the tests' model) and
`--checkpoint DIR` another checkpoint. The roles themselves (`router`, `prefill-worker`, `decode-worker`) keep
`tiny` as their default: `serve` hands them its choice explicitly. Torch-free (the floor).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "models" / "v4-byte-demo"
FALLBACK_PRESET = "tiny"  # what a checkpoint directory without a config.json is read as
PRESET_HELP = ("model preset with random weights from --seed: tiny, bench, v4-flash, v4-pro (default: none, the "
               "shipped trained checkpoint v4-byte-demo)")


def choose_model(preset: str | None, checkpoint: str | None) -> tuple[str, str | None]:
    """(preset, checkpoint) a command runs: as given; with neither, the shipped checkpoint."""
    if preset is None and checkpoint is None:
        if not (DEFAULT_CHECKPOINT / "config.json").is_file():
            raise ValueError(f"the default model's files are missing from {DEFAULT_CHECKPOINT} (a broken install?); "
                             "name a model with --preset or --checkpoint")
        return FALLBACK_PRESET, str(DEFAULT_CHECKPOINT)
    return preset or FALLBACK_PRESET, checkpoint
