"""The MossFormer2 mask network: fbank features (B, T, 180) -> mask (B, T, 961).

Architecture and parameter layout follow ClearerVoice-Studio's MossFormer2_SE_48K (see REFERENCE.md); the
code is ours. Submodule names and positions mirror the reference checkpoint (``to_hidden.mdl.3.sequential.1
.conv`` and the like), so reference state dicts load strictly and our exports load in ClearerVoice. Modules
that exist only to hold parameters at those paths say so.

Where the reference transposes between (B, C, T) and (B, T, C) around every convolution and norm, we keep
activations channels-last, (B, T, C), end to end:
- 1x1 convolutions are ``F.linear`` on the same weights,
- depthwise time convolutions run as channels-last ``conv2d`` (no copies) with the residual folded into the
  kernel's centre tap,
- GroupNorm(1, C) is ``layer_norm`` over (T, C),
- the attention unit attends over v and u together (one hidden tensor), adds the linear-attention term
  inside the batched matmul, and pads only what grouping needs,
- the second "speaker" of the output head is never used by the reference, so it is not computed.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from rotary_embedding_torch import RotaryEmbedding, apply_rotary_emb
from torch import Tensor, nn

from .config import DEFAULT_PRESET, MossFormer2Config, resolve_config

# Fixed by the reference: the rotary embedding's and the sinusoidal position embedding's base.
_ROTARY_THETA = 10000.0
_SINUSOID_BASE = 10000.0


def _sinusoid_inv_freq(dim: int, device: torch.device) -> Tensor:
    return 1.0 / (_SINUSOID_BASE ** (torch.arange(0, dim, 2, device=device).float() / dim))


def _rotary_inv_freq(dim: int, device: torch.device) -> Tensor:
    # rotary-embedding-torch's formula for freqs_for='lang'.
    return 1.0 / (_ROTARY_THETA ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))


def _angle_dtype(x: Tensor) -> torch.dtype:
    """Position angles are computed in at least fp32: in bf16 frame 257 would be frame 256."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _full_precision_table(stored: Tensor, recompute) -> Tensor:
    """A fixed frequency table. A module-wide .half()/.bfloat16() (DeepSpeed does this) rounds the stored
    copy to ~3 digits, which at frame 500 moves a phase by radians, so then we recompute it in fp32."""
    if stored.dtype in (torch.float32, torch.float64):
        return stored
    return recompute(stored.device)


def _centre_tap(kernel: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """(K,): 1 at the centre, 0 elsewhere: the identity as a 'same' convolution's taps."""
    tap = torch.zeros(kernel, dtype=dtype, device=device)
    tap[kernel // 2] = 1.0
    return tap


def _time_conv(x: Tensor, taps: Tensor) -> Tensor:
    """Depthwise 'same' convolution along time of channels-last x (B, T, C) with taps (C, 1, 1, K), run as
    conv2d on the (B, C, 1, T) view, which is channels-last in memory, so no transposed copies are made."""
    kernel = taps.shape[-1]
    y = F.conv2d(x.transpose(1, 2).unsqueeze(2), taps, padding=(0, kernel // 2), groups=x.shape[-1])
    return y.squeeze(2).transpose(1, 2)


def _time_conv_weight_grad(x: Tensor, grad: Tensor, kernel: int) -> Tensor:
    """(C, K): tap k's gradient is the sum over batch and time of grad[t] * x[t + k - K // 2] per channel.
    Per batch item, so that every operand is a contiguous block of frames (no padded copy of x), and with
    one scratch buffer for the products (fresh multi-MB temporaries cost page faults)."""
    batch, frames, channels = x.shape
    scratch = torch.empty_like(grad[0])
    accumulate = torch.promote_types(grad.dtype, torch.float32)
    taps = torch.zeros(kernel, channels, dtype=accumulate, device=grad.device)
    for k in range(kernel):
        shift = k - kernel // 2
        overlap = frames - abs(shift)
        if overlap <= 0:
            continue
        for b in range(batch):
            if shift >= 0:
                product = torch.mul(grad[b, :overlap], x[b, shift:], out=scratch[:overlap])
            else:
                product = torch.mul(grad[b, -shift:], x[b, :overlap], out=scratch[:overlap])
            taps[k] += product.sum(dim=0, dtype=accumulate)
    return taps.t().to(grad.dtype)


def _time_conv_weight_grad_fused(x: Tensor, grad: Tensor, kernel: int) -> Tensor:
    """The same (C, K) sums as ``_time_conv_weight_grad``, as one expression over the K shifted windows of x. Under
    torch.compile that is one generated reduction, where the loop above, traced, unrolls into K x B reductions per
    convolution (17 or 39 taps, 144 convolutions in the full model), slower to compile and to run. Run eagerly it
    would materialise B x K x C x T products."""
    half = kernel // 2
    padded = F.pad(x, (0, 0, half, half))  # (B, T + K - 1, C)
    windows = padded.unfold(1, x.shape[1], 1)  # (B, K, C, T): windows[b, k, c, t] = x[b, t + k - K // 2, c]
    accumulate = torch.promote_types(grad.dtype, torch.float32)
    products = windows.to(accumulate) * grad.transpose(1, 2).unsqueeze(1).to(accumulate)
    return products.sum(dim=(0, 3)).t().to(grad.dtype)


# Below this many frames x channels per batch item oneDNN's own backward is as fast (tiny models).
_CPU_BACKWARD_MIN_ELEMENTS = 32768


class _CpuTimeConv(torch.autograd.Function):
    """``_time_conv`` with a CPU backward of our own. oneDNN's channels-last depthwise backward is slow,
    its weight gradient worst: fwd+bwd for 2048 channels x 496 frames takes 62 ms on one thread, 9 ms
    here (the reference's channels-first Conv1d: 40 ms, transposes included)."""

    @staticmethod
    def forward(ctx, x: Tensor, taps: Tensor) -> Tensor:
        ctx.save_for_backward(x, taps)
        return _time_conv(x, taps)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, taps = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_taps = None
        if ctx.needs_input_grad[0]:
            grad_x = _time_conv(grad, taps.flip(-1))  # a 'same' correlation's adjoint: the flipped kernel
        if ctx.needs_input_grad[1]:
            weight_grad = _time_conv_weight_grad_fused if torch.compiler.is_compiling() else _time_conv_weight_grad
            grad_taps = weight_grad(x, grad, taps.shape[-1]).view_as(taps)
        return grad_x, grad_taps


def depthwise_time_conv_residual(x: Tensor, weight: Tensor, identity: Tensor | None = None) -> Tensor:
    """``x + depthwise_conv(x)`` along time with 'same' zero padding, for channels-last x (B, T, C).

    ``weight`` holds C * K taps (shaped (C, 1, K) or (C, 1, K, 1)); the identity is folded into the centre
    tap. ``identity`` is that centre tap, ``_centre_tap(K)`` in the weight's dtype and device: the modules keep
    it as a buffer, so that a forward does not build it again (three tiny kernels per call, 144 calls per
    forward of the full model); without it, it is built here. Under autocast the convolution runs in the
    autocast dtype, as a plain convolution would.
    """
    channels = x.shape[-1]
    kernel = weight.numel() // channels
    taps = weight.reshape(channels, 1, 1, kernel)
    if identity is None or identity.dtype != taps.dtype or identity.device != taps.device:
        identity = _centre_tap(kernel, taps.dtype, taps.device)
    taps = taps + identity
    device = x.device.type
    # The meta device (model/flops.py counts FLOPs there, computing nothing) has no autocast to ask about.
    autocast = device != "meta" and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    x, taps = x.to(dtype).contiguous(), taps.to(dtype)
    if device != "cpu" or not torch.is_grad_enabled() or not (x.requires_grad or taps.requires_grad) \
            or x.shape[1] * x.shape[2] < _CPU_BACKWARD_MIN_ELEMENTS:
        return _time_conv(x, taps)
    with torch.autocast(device, enabled=False):
        return _CpuTimeConv.apply(x, taps)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout. On CPU, F.dropout's Bernoulli sampling costs twice a uniform draw and a compare,
    and dropout runs on six activations per layer, so draw uniforms there."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep = torch.rand(x.shape, device=x.device).ge_(p).mul_(1.0 / (1.0 - p))
    return x * keep.to(x.dtype)


class Dropout(nn.Dropout):
    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def group_norm_1(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    """GroupNorm with one group (each sample normalised over all frames and channels) on (B, T, C)."""
    y = F.layer_norm(x, x.shape[1:], eps=norm.eps)
    return torch.addcmul(norm.bias.to(y.dtype), y, norm.weight.to(y.dtype))


def _pointwise(conv: nn.Conv1d) -> Tensor:
    """A 1x1 Conv1d's weight as a Linear weight."""
    return conv.weight.view(conv.out_channels, conv.in_channels)


class ScaleNorm(nn.Module):
    """x / max(||x|| / sqrt(dim), eps) * g."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.scale = dim ** -0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def normalize(self, x: Tensor) -> Tensor:
        """Everything but the gain. Dividing (not multiplying by an inverse) keeps fp16 finite: the result
        is at most sqrt(dim) while the inverse norm may be 1 / eps."""
        return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.scale).clamp(min=self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x) * self.g


class _DepthwiseConv(nn.Module):
    """Holds a depthwise Conv1d's weight at the reference's ``.conv`` path."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)


class TimeConvResidual(nn.Module):
    """x + depthwise_conv(x) over time. ``sequential.1.conv`` is the reference's parameter path; slot 0 was
    a transpose there and holds nothing."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.sequential = nn.Sequential(nn.Identity(), _DepthwiseConv(channels, kernel))
        # Not in the state dict: reference checkpoints and our exports keep their keys.
        self.register_buffer("identity_tap", _centre_tap(kernel), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return depthwise_time_conv_residual(x, self.sequential[1].conv.weight, self.identity_tap)


class FeedForwardConv(nn.Module):
    """norm -> Linear -> SiLU -> x + depthwise conv -> dropout (the reference's FFConvM), channels-last.
    The layers sit in ``mdl`` at the reference's indices (2 is the SiLU, 4 the dropout)."""

    def __init__(self, dim_in: int, dim_out: int, norm: nn.Module, kernel: int, dropout: float) -> None:
        super().__init__()
        self.mdl = nn.Sequential(norm, nn.Linear(dim_in, dim_out), nn.SiLU(),
                                 TimeConvResidual(dim_out, kernel), Dropout(dropout))

    @property
    def norm(self) -> nn.Module:
        return self.mdl[0]

    def project(self, normed: Tensor) -> Tensor:
        """Everything after the norm."""
        linear, conv, dropout = self.mdl[1], self.mdl[3], self.mdl[4]
        return dropout(conv(F.silu(linear(normed))))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.norm(x))


class OffsetScale(nn.Module):
    """Per-head affine copies of one tensor: (..., d) -> (..., heads, d)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(heads, dim))
        self.beta = nn.Parameter(torch.zeros(heads, dim))
        nn.init.normal_(self.gamma, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.beta, x.unsqueeze(-2), self.gamma)


class GatedAttentionUnit(nn.Module):
    """FLASH-style gated attention unit with shared quadratic (in-group) and linear (global) attention;
    the reference's FLASH_ShareA_FFConvM (non-causal)."""

    def __init__(self, cfg: MossFormer2Config, rotary: RotaryEmbedding) -> None:
        super().__init__()
        dim = cfg.model_dim
        self.group_size = cfg.group_size_frames
        self.rotary_pos_emb = rotary  # shared by all layers, as in the reference (one state-dict key each)
        self.attn_dropout = cfg.dropout
        self.to_hidden = FeedForwardConv(dim, cfg.hidden_dim, ScaleNorm(dim), cfg.conv_kernel_frames, cfg.dropout)
        self.to_qk = FeedForwardConv(dim, cfg.query_key_dim, ScaleNorm(dim), cfg.conv_kernel_frames, cfg.dropout)
        self.qk_offset_scale = OffsetScale(cfg.query_key_dim, heads=4)
        self.to_out = FeedForwardConv(cfg.hidden_dim // 2, dim, ScaleNorm(cfg.hidden_dim // 2),
                                      cfg.conv_kernel_frames, cfg.dropout)

    def forward(self, x: Tensor, rotary_angles: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        # Token shift: the first half of the channels comes from the previous frame.
        shifted = torch.cat((F.pad(x[:, :-1, :half], (0, 0, 1, 0)), x[:, :, half:]), dim=-1)
        # to_hidden and to_qk normalise the same input; only their gains differ.
        normed = self.to_hidden.norm.normalize(shifted)
        hidden = self.to_hidden.project(normed * self.to_hidden.norm.g)  # [v | u]
        qk = self.to_qk.project(normed * self.to_qk.norm.g)
        qk = apply_rotary_emb(rotary_angles, self.qk_offset_scale(qk))  # (B, T, 4, d), rotated together
        quad_q, lin_q, quad_k, lin_k = qk.unbind(-2)
        att = self._attend(quad_q, lin_q, quad_k, lin_k, hidden)
        v, u = hidden.chunk(2, dim=-1)
        att_v, att_u = att.chunk(2, dim=-1)
        return x + self.to_out((att_u * v) * torch.sigmoid(att_v * u))

    def _attend(self, quad_q: Tensor, lin_q: Tensor, quad_k: Tensor, lin_k: Tensor, hidden: Tensor) -> Tensor:
        """relu(q k^T / g)^2 within groups of g frames plus global linear attention, applied to [v | u]."""
        batch, frames, width = hidden.shape
        g = self.group_size
        groups = -(-frames // g)
        padding = groups * g - frames
        # Linear attention over the real frames; padded frames would only add zeros.
        lin_kv = torch.matmul(lin_k.transpose(1, 2), hidden) / frames  # (B, d, width)
        if padding:
            # Padded keys are zero, so padded frames get zero attention weight without a mask. (Appending
            # zeros with cat writes each tensor once; F.pad fills it with zeros first.)
            quad_q, quad_k, lin_q, hidden = (torch.cat((t, t.new_zeros(batch, padding, t.shape[-1])), dim=1)
                                             for t in (quad_q, quad_k, lin_q, hidden))
        lin_out = torch.matmul(lin_q, lin_kv)  # (B, T', width), contiguous
        qg = quad_q.reshape(batch * groups, g, -1)
        kg = quad_k.reshape(batch * groups, g, -1)
        attn = F.relu(torch.bmm(qg, kg.transpose(1, 2)) / g).square()
        attn = dropout(attn, self.attn_dropout, self.training)
        out = torch.baddbmm(lin_out.view(batch * groups, g, width), attn, hidden.reshape(batch * groups, g, width))
        out = out.view(batch, groups * g, width)
        # split, not slicing: slicing's backward zero-fills a full-size gradient and then copies into it.
        return out.split((frames, padding), dim=1)[0] if padding else out


class FSMN(nn.Module):
    """Deep FSMN memory: x + (p + depthwise_conv(p)), p = project(relu(linear(x))); the reference's
    UniDeepFsmn. The (C, 1, 2n+1, 1) Conv2d holds the taps in the reference's layout."""

    def __init__(self, dim: int, hidden: int, context_frames: int) -> None:
        super().__init__()
        kernel = 2 * context_frames + 1
        self.linear = nn.Linear(dim, hidden)
        self.project = nn.Linear(hidden, dim, bias=False)
        self.conv1 = nn.Conv2d(dim, dim, (kernel, 1), groups=dim, bias=False)
        self.register_buffer("identity_tap", _centre_tap(kernel), persistent=False)  # as in TimeConvResidual

    def forward(self, x: Tensor) -> Tensor:
        p = self.project(F.relu(self.linear(x)))
        return x + depthwise_time_conv_residual(p, self.conv1.weight, self.identity_tap)


class GatedFSMN(nn.Module):
    def __init__(self, dim: int, kernel: int, context_frames: int, dropout: float) -> None:
        super().__init__()
        self.to_u = FeedForwardConv(dim, dim, nn.LayerNorm(dim), kernel, dropout)
        self.to_v = FeedForwardConv(dim, dim, nn.LayerNorm(dim), kernel, dropout)
        self.fsmn = FSMN(dim, dim, context_frames)

    def forward(self, x: Tensor) -> Tensor:
        u = self.to_u(x)
        v = self.to_v(x)
        return torch.addcmul(x, v, self.fsmn(u))


class GatedFSMNBlock(nn.Module):
    """1x1 conv + PReLU -> LayerNorm -> gated FSMN -> LayerNorm -> 1x1 conv, residual; channels-last."""

    def __init__(self, cfg: MossFormer2Config) -> None:
        super().__init__()
        dim, inner = cfg.model_dim, cfg.fsmn_inner_dim
        self.conv1 = nn.Sequential(nn.Conv1d(dim, inner, kernel_size=1), nn.PReLU())
        self.norm1 = nn.LayerNorm(inner)
        self.gated_fsmn = GatedFSMN(inner, cfg.conv_kernel_frames, cfg.fsmn_context_frames, cfg.dropout)
        self.norm2 = nn.LayerNorm(inner)
        self.conv2 = nn.Conv1d(inner, dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        conv, prelu = self.conv1[0], self.conv1[1]
        h = F.prelu(F.linear(x, _pointwise(conv), conv.bias), prelu.weight)
        h = self.gated_fsmn(self.norm1(h))
        return x + F.linear(self.norm2(h), _pointwise(self.conv2), self.conv2.bias)


class MossFormerBlocks(nn.Module):
    """num_layers x [gated attention unit, gated FSMN block]; the reference's MossformerBlock_GFSMN."""

    def __init__(self, cfg: MossFormer2Config) -> None:
        super().__init__()
        self.rotary_dim = cfg.rotary_dim
        rotary = RotaryEmbedding(dim=cfg.rotary_dim, theta=_ROTARY_THETA)
        self.fsmn = nn.ModuleList([GatedFSMNBlock(cfg) for _ in range(cfg.num_layers)])
        self.layers = nn.ModuleList([GatedAttentionUnit(cfg, rotary) for _ in range(cfg.num_layers)])

    def rotary_angles(self, frames: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(T, 1, rotary_dim) angles, interleaved pairs as rotary-embedding-torch builds them."""
        rotary = self.layers[0].rotary_pos_emb
        freqs = _full_precision_table(rotary.freqs, lambda dev: _rotary_inv_freq(self.rotary_dim, dev))
        positions = torch.arange(frames, device=device, dtype=dtype)
        return torch.outer(positions, freqs.to(device, dtype)).repeat_interleave(2, dim=-1).unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        angles = self.rotary_angles(x.shape[1], x.device, _angle_dtype(x))
        for attention, fsmn in zip(self.layers, self.fsmn):
            x = fsmn(attention(x, angles))
        return x


class _BlocksWithNorm(nn.Module):
    """Holds the blocks and their final LayerNorm at the reference's ``intra_mdl`` paths."""

    def __init__(self, cfg: MossFormer2Config) -> None:
        super().__init__()
        self.mossformerM = MossFormerBlocks(cfg)
        self.norm = nn.LayerNorm(cfg.model_dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.mossformerM(x))


class ComputationBlock(nn.Module):
    """blocks -> LayerNorm -> GroupNorm(1) -> + input."""

    def __init__(self, cfg: MossFormer2Config) -> None:
        super().__init__()
        self.intra_mdl = _BlocksWithNorm(cfg)
        self.intra_norm = nn.GroupNorm(1, cfg.model_dim, eps=1e-8)

    def forward(self, x: Tensor) -> Tensor:
        return x + group_norm_1(self.intra_mdl(x), self.intra_norm)


class ScaledSinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("inv_freq", _sinusoid_inv_freq(dim, torch.device("cpu")))

    def forward(self, frames: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(T, dim): [sin | cos] of position * inv_freq, times the learned scale."""
        dim = self.inv_freq.numel() * 2
        inv_freq = _full_precision_table(self.inv_freq, lambda dev: _sinusoid_inv_freq(dim, dev))
        angles = torch.outer(torch.arange(frames, device=device, dtype=dtype), inv_freq.to(device, dtype))
        return torch.cat((angles.sin(), angles.cos()), dim=-1) * self.scale.to(dtype)


class MaskNet(nn.Module):
    """GroupNorm -> 1x1 conv -> + position embedding -> computation block -> PReLU -> gated output head
    -> 1x1 conv -> ReLU; the reference's MossFormer_MaskNet, channels-last."""

    def __init__(self, cfg: MossFormer2Config) -> None:
        super().__init__()
        self.feature_dim = cfg.feature_dim
        self.model_dim = cfg.model_dim
        dim = cfg.model_dim
        self.norm = nn.GroupNorm(1, cfg.feature_dim, eps=1e-8)
        self.conv1d_encoder = nn.Conv1d(cfg.feature_dim, dim, 1, bias=False)
        self.pos_enc = ScaledSinusoidalEmbedding(dim)
        self.mdl = ComputationBlock(cfg)
        self.conv1d_out = nn.Conv1d(dim, dim * cfg.num_speakers, kernel_size=1)
        self.conv1_decoder = nn.Conv1d(dim, cfg.num_bins, 1, bias=False)
        self.prelu = nn.PReLU()
        self.output = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.Tanh())
        self.output_gate = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.Sigmoid())

    def forward(self, fbank: Tensor) -> Tensor:
        if fbank.dim() != 3 or fbank.shape[-1] != self.feature_dim or fbank.shape[1] < 1:
            raise ValueError(f"expected fbank features shaped (batch, frames >= 1, {self.feature_dim}), "
                             f"got {tuple(fbank.shape)}")
        frames = fbank.shape[1]
        x = F.linear(group_norm_1(fbank, self.norm), _pointwise(self.conv1d_encoder))
        x = x + self.pos_enc(frames, x.device, _angle_dtype(x)).to(x.dtype)
        x = F.prelu(self.mdl(x), self.prelu.weight)
        # Only source 0 (the first model_dim output channels) is the speech the reference returns.
        dim = self.model_dim
        x = F.linear(x, _pointwise(self.conv1d_out)[:dim], self.conv1d_out.bias[:dim])
        out, gate = self.output[0], self.output_gate[0]
        x = torch.tanh(F.linear(x, _pointwise(out), out.bias)) * torch.sigmoid(
            F.linear(x, _pointwise(gate), gate.bias))
        return F.relu(F.linear(x, _pointwise(self.conv1_decoder)))


class MossFormer2(nn.Module):
    """fbank (B, T, feature_dim) -> mask (B, T, num_bins) in [0, inf). State-dict keys start with
    ``mossformer.``, as in ClearerVoice checkpoints."""

    def __init__(self, config: MossFormer2Config) -> None:
        super().__init__()
        self.config = config
        self.mossformer = MaskNet(config)

    def forward(self, fbank: Tensor) -> Tensor:
        return self.mossformer(fbank)


def build_model(preset_or_config: "str | MossFormer2Config | Mapping[str, Any]" = DEFAULT_PRESET) -> MossFormer2:
    """Build the mask network from a preset name, a config, or a dict of config fields."""
    return MossFormer2(resolve_config(preset_or_config))


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MossFormer2", "build_model", "count_trainable_parameters", "depthwise_time_conv_residual"]
