"""Sizes of the MossFormer2 mask network, and the named presets.

Every preset runs the same code; only sizes change. ``mossformer2_se_48k`` is ClearerVoice's
MossFormer2_SE_48K (55,262,154 trainable parameters); ``tiny`` and ``small`` are for CPU tests and demos.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class MossFormer2Config:
    # Input features per frame: 60 log-mel + deltas + delta-deltas.
    feature_dim: int = 180
    # Width of the MossFormer2 blocks (the reference's ``out_channels``).
    model_dim: int = 512
    # Output mask bins per frame (n_fft 1920 -> 961 bins).
    num_bins: int = 961
    # Number of [gated attention unit, gated FSMN block] pairs.
    num_layers: int = 24
    # Frames per quadratic-attention group; the sequence is zero-padded to a multiple of it.
    group_size_frames: int = 256
    query_key_dim: int = 128
    # Hidden width of the attention unit = model_dim * expansion_factor, split into v and u.
    expansion_factor: float = 4.0
    # Leading query/key dimensions that get the rotary position embedding.
    rotary_dim: int = 32
    # Depthwise convolution inside every feed-forward projection.
    conv_kernel_frames: int = 17
    fsmn_inner_dim: int = 256
    # The FSMN memory looks this many frames back and ahead (kernel 2 * n + 1).
    fsmn_context_frames: int = 19
    # The output projection is sized for this many sources; only source 0 (the speech) is used.
    # Kept so that reference checkpoints load unchanged.
    num_speakers: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        positive = ("feature_dim", "model_dim", "num_bins", "num_layers", "group_size_frames",
                    "query_key_dim", "rotary_dim", "conv_kernel_frames", "fsmn_inner_dim", "num_speakers")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MossFormer2Config.{name} must be a positive integer, got {value!r}")
        if self.model_dim % 2:
            raise ValueError(f"MossFormer2Config.model_dim must be even (half the channels are token-shifted), "
                             f"got {self.model_dim}")
        if self.rotary_dim % 2 or self.rotary_dim > self.query_key_dim:
            raise ValueError(f"MossFormer2Config.rotary_dim must be even and <= query_key_dim "
                             f"({self.query_key_dim}), got {self.rotary_dim}")
        if self.conv_kernel_frames % 2 == 0:
            raise ValueError(f"MossFormer2Config.conv_kernel_frames must be odd, got {self.conv_kernel_frames}")
        if isinstance(self.fsmn_context_frames, bool) or not isinstance(self.fsmn_context_frames, int) \
                or self.fsmn_context_frames < 0:
            raise ValueError(f"MossFormer2Config.fsmn_context_frames must be an integer >= 0, "
                             f"got {self.fsmn_context_frames!r}")
        if not self.expansion_factor > 0 or int(self.model_dim * self.expansion_factor) % 2:
            raise ValueError(f"MossFormer2Config.expansion_factor must make model_dim * expansion_factor an even "
                             f"integer, got {self.expansion_factor!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MossFormer2Config.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def hidden_dim(self) -> int:
        """Width of the attention unit's hidden projection (v and u together)."""
        return int(self.model_dim * self.expansion_factor)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "MossFormer2Config":
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            raise ValueError(f"unknown MossFormer2Config field(s) {unknown}; valid fields: {valid}")
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, MossFormer2Config] = {
    # ClearerVoice-Studio MossFormer2_SE_48K.
    "mossformer2_se_48k": MossFormer2Config(),
    # Mid-size model for a single GPU or patient CPU runs.
    "small": MossFormer2Config(model_dim=256, num_layers=6, query_key_dim=64, fsmn_inner_dim=128),
    # CPU tests and the 2-rank demo: fast at 1 s crops (121 frames, two 64-frame groups), still learns.
    "tiny": MossFormer2Config(model_dim=64, num_layers=2, group_size_frames=64, query_key_dim=32,
                              fsmn_inner_dim=32),
}

DEFAULT_PRESET = "mossformer2_se_48k"


def resolve_config(preset_or_config: "str | MossFormer2Config | Mapping[str, Any]" = DEFAULT_PRESET
                   ) -> MossFormer2Config:
    """A preset name, a config, or a dict of config fields -> a config."""
    if isinstance(preset_or_config, MossFormer2Config):
        return preset_or_config
    if isinstance(preset_or_config, str):
        try:
            return PRESETS[preset_or_config]
        except KeyError:
            raise ValueError(f"unknown MossFormer2 preset {preset_or_config!r}; "
                             f"valid presets: {sorted(PRESETS)}") from None
    if isinstance(preset_or_config, Mapping):
        return MossFormer2Config.from_dict(preset_or_config)
    raise TypeError(f"expected a preset name, a MossFormer2Config or a dict of its fields, "
                    f"got {type(preset_or_config).__name__}")
