"""MossFormer2 48 kHz speech enhancement: the network, its features, loss, checkpoints and inference.

Matches ClearerVoice-Studio's MossFormer2_SE_48K (see REFERENCE.md) and loads its checkpoints. This
package imports neither ``deepspeed`` nor ``launcher``.
"""

from .checkpoint import CheckpointError, export_reference_checkpoint, load_reference_checkpoint
from .config import DEFAULT_PRESET, PRESETS, MossFormer2Config
from .inference import enhance
from .features import FEATURE_DIM, HOP, N_BINS, N_FFT, SAMPLE_RATE_HZ, compute_features, istft, num_frames, stft
from .loss import apply_mask, mask_loss, si_snr, target_mask, validation_metrics
from .network import MossFormer2, build_model, count_trainable_parameters

__all__ = [
    "CheckpointError",
    "DEFAULT_PRESET",
    "FEATURE_DIM",
    "HOP",
    "MossFormer2",
    "MossFormer2Config",
    "N_BINS",
    "N_FFT",
    "PRESETS",
    "SAMPLE_RATE_HZ",
    "apply_mask",
    "build_model",
    "compute_features",
    "count_trainable_parameters",
    "enhance",
    "export_reference_checkpoint",
    "istft",
    "load_reference_checkpoint",
    "mask_loss",
    "num_frames",
    "si_snr",
    "stft",
    "target_mask",
    "validation_metrics",
]
