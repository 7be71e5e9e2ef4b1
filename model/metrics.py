"""The speech-enhancement metrics users report: PESQ, STOI/ESTOI, SI-SDR and DNSMOS, one pair at a time.

PESQ, STOI and DNSMOS come from the libraries the field uses, unchanged: ``pesq`` (ITU-T P.862.2 wide band),
``pystoi`` (STOI, and extended STOI) and ``speechmos`` (DNSMOS P.835, whose ONNX models it ships; run by
onnxruntime, nothing is downloaded). PESQ and DNSMOS are defined at 16 kHz (speechmos refuses other rates; pystoi
resamples to its 10 kHz itself): 48 kHz signals are resampled with torchaudio. SI-SDR is ours (:func:`si_sdr`),
computed on the 48 kHz signals. DNSMOS, as in Microsoft's reference script, repeats a clip shorter than 9.01 s
until it is that long and scores a longer one in 9.01 s windows every second, averaged: its cost grows with the
length (about one model run per second of audio), and it is the slowest of the four.

A metric that is undefined for a pair (a silent clean reference, a signal shorter than PESQ's 0.25 s,
non-finite samples, ...) is ``None`` with a reason in the notes, never an exception: one bad file must not
end the evaluation of a corpus.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

METRIC_SAMPLE_RATE_HZ = 16000  # PESQ wide band and DNSMOS are defined at 16 kHz
# The metric columns of one signal, in report order; each group is computed (or skipped) as a whole.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "pesq": ("pesq_wb",),
    "stoi": ("stoi", "estoi"),
    "si_sdr": ("si_sdr",),
    "dnsmos": ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"),
}
# Higher is better for every one of them; units: PESQ MOS-LQO 1.04-4.64, STOI 0-1, SI-SDR dB, DNSMOS 1-5.
METRIC_NAMES = tuple(name for names in METRIC_GROUPS.values() for name in names)
NOISY_SUFFIX = "_noisy"


def si_sdr(estimate: Tensor, reference: Tensor) -> Tensor:
    """Scale-invariant SDR in dB (Le Roux et al., "SDR - half-baked or well done?", ICASSP 2019).

    Both signals are made zero-mean, then ``alpha = <s_hat, s> / ||s||^2`` and
    ``SI-SDR = 10 log10(||alpha s||^2 / ||s_hat - alpha s||^2)``. (L,) or (B, L) pairs -> () or (B,), computed
    in float64. This is the quantity ``model.loss.si_snr`` computes for training (Luo & Mesgarani's SI-SNR is
    the same definition), without that function's 1e-6 guards, which bias quiet signals; here a reference
    with no energy, or an estimate exactly proportional to the reference (infinite SI-SDR), gives NaN.
    """
    if estimate.shape != reference.shape or estimate.dim() not in (1, 2):
        raise ValueError(f"expected estimate and reference of one shape, (samples,) or (batch, samples), got "
                         f"{tuple(estimate.shape)} and {tuple(reference.shape)}")
    estimate = estimate.double() - estimate.double().mean(dim=-1, keepdim=True)
    reference = reference.double() - reference.double().mean(dim=-1, keepdim=True)
    reference_energy = reference.square().sum(dim=-1, keepdim=True)
    alpha = (estimate * reference).sum(dim=-1, keepdim=True) / reference_energy
    target = alpha * reference
    target_energy = target.square().sum(dim=-1)
    residual_energy = (estimate - target).square().sum(dim=-1)
    value = 10.0 * torch.log10(target_energy / residual_energy)
    undefined = (reference_energy.squeeze(-1) == 0) | ~torch.isfinite(value)
    return torch.where(undefined, torch.full_like(value, math.nan), value)


def resample_for_metrics(waveform: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    """float32 at 16 kHz (torchaudio's windowed-sinc resampler), as PESQ and DNSMOS want."""
    if sample_rate_hz == METRIC_SAMPLE_RATE_HZ:
        return np.asarray(waveform, dtype=np.float32)
    import torchaudio.functional as AF

    x = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
    return AF.resample(x, sample_rate_hz, METRIC_SAMPLE_RATE_HZ).numpy()


_DNSMOS = None


def _dnsmos():
    """speechmos's DNSMOS P.835 (its ONNX models, features and polynomial fit), built once per process.

    speechmos creates its onnxruntime sessions with default options, which start one thread per core in
    every process: with several metric workers that oversubscribes the CPUs, and thread counts may change the
    sums. One intra-op thread each keeps the scores identical however the work is spread; parallelism comes
    from the metric workers.
    """
    global _DNSMOS
    if _DNSMOS is None:
        import onnxruntime
        from speechmos import dnsmos

        class SingleThreadDNSMOS(dnsmos.DNSMOS):
            def __init__(self, primary_model_path: str, p808_model_path: str) -> None:
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = 1
                options.inter_op_num_threads = 1
                providers = ["CPUExecutionProvider"]
                self.primary_model_path = primary_model_path
                self.onnx_sess = onnxruntime.InferenceSession(primary_model_path, options, providers=providers)
                self.p808_onnx_sess = onnxruntime.InferenceSession(p808_model_path, options, providers=providers)

        models = os.path.join(os.path.dirname(os.path.abspath(dnsmos.__file__)), "dnsmos_models")
        _DNSMOS = SingleThreadDNSMOS(os.path.join(models, "sig_bak_ovr.onnx"), os.path.join(models, "model_v8.onnx"))
    return _DNSMOS


class _Scores:
    """Values and notes of one pair; a note names every column it explains."""

    def __init__(self) -> None:
        self.values: dict[str, float | None] = {}
        self.reasons: dict[str, list[str]] = {}

    def set(self, column: str, value: float | None) -> None:
        self.values[column] = None if value is None or not math.isfinite(value) else float(value)

    def undefined(self, columns: Iterable[str], reason: str) -> None:
        columns = list(columns)
        for column in columns:
            self.values[column] = None
        self.reasons.setdefault(reason, []).extend(columns)

    def notes(self) -> str:
        return "; ".join(f"{', '.join(columns)}: {reason}" for reason, columns in self.reasons.items())


def _first_line(error: BaseException) -> str:
    text = error.args[0] if error.args and isinstance(error.args[0], bytes) else str(error)
    if isinstance(text, bytes):  # pesq's errors carry the C library's bytes
        text = text.decode(errors="replace")
    text = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return text[:1].lower() + text[1:]


def _pesq(scores: _Scores, suffix: str, signal_16k: np.ndarray, clean_16k: np.ndarray) -> None:
    from pesq import PesqError, pesq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pesq divides by a zero peak before it raises
        try:
            scores.set("pesq_wb" + suffix, pesq(METRIC_SAMPLE_RATE_HZ, clean_16k, signal_16k, "wb"))
        except PesqError as error:
            scores.undefined(["pesq_wb" + suffix], f"PESQ: {_first_line(error)}")


def _stoi(scores: _Scores, suffix: str, signal_16k: np.ndarray, clean_16k: np.ndarray) -> None:
    from pystoi import stoi

    for name, extended in (("stoi", False), ("estoi", True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = stoi(clean_16k, signal_16k, METRIC_SAMPLE_RATE_HZ, extended=extended)
        # pystoi warns and returns 1e-5 when too few frames are left after its silence removal.
        problem = next((str(w.message) for w in caught if "frames" in str(w.message)), None)
        if problem is not None:
            first = problem.split(".")[0]
            scores.undefined([name + suffix], f"pystoi: {first[:1].lower()}{first[1:]}")
        else:
            scores.set(name + suffix, value)


def _si_sdr(scores: _Scores, suffix: str, signal: np.ndarray, clean: np.ndarray) -> None:
    value = si_sdr(torch.from_numpy(signal), torch.from_numpy(clean)).item()
    if math.isnan(value):
        scores.undefined(["si_sdr" + suffix], "SI-SDR: the estimate equals the reference up to scale (infinite)")
    else:
        scores.set("si_sdr" + suffix, value)


def _dnsmos_scores(scores: _Scores, suffix: str, signal_16k: np.ndarray) -> None:
    peak = float(np.abs(signal_16k).max())
    if peak > 1.0:  # DNSMOS takes samples in [-1, 1], as a 16-bit WAV of the signal would hold them
        columns = [name + suffix for name in METRIC_GROUPS["dnsmos"]]
        scores.reasons.setdefault(f"peak {peak:.2f} clipped to [-1, 1] for DNSMOS", []).extend(columns)
    result = _dnsmos()(np.clip(signal_16k, -1.0, 1.0), METRIC_SAMPLE_RATE_HZ, False)
    for name, key in (("dnsmos_sig", "sig_mos"), ("dnsmos_bak", "bak_mos"), ("dnsmos_ovrl", "ovrl_mos")):
        scores.set(name + suffix, float(result[key]))


_LIBRARY = {"pesq": "pesq", "stoi": "pystoi", "si_sdr": "SI-SDR", "dnsmos": "speechmos DNSMOS"}


def _score_signal(scores: _Scores, suffix: str, signal: np.ndarray, signal_16k: np.ndarray,
                  clean: np.ndarray | None, clean_16k: np.ndarray | None, groups: tuple[str, ...],
                  clean_problem: str | None) -> None:
    """One signal's metrics against the clean reference (DNSMOS needs none) into ``scores``. A library that
    fails on a signal (pystoi on one shorter than its frames, say) leaves its columns empty with its error."""
    for group in groups:
        columns = [name + suffix for name in METRIC_GROUPS[group]]
        if group != "dnsmos" and clean_problem is not None:
            scores.undefined(columns, clean_problem)
            continue
        try:
            if group == "pesq":
                _pesq(scores, suffix, signal_16k, clean_16k)
            elif group == "stoi":
                _stoi(scores, suffix, signal_16k, clean_16k)
            elif group == "si_sdr":
                _si_sdr(scores, suffix, signal, clean)
            else:
                _dnsmos_scores(scores, suffix, signal_16k)
        except Exception as error:  # noqa: BLE001 - a metric's failure is this pair's note, not the run's end
            scores.undefined(columns, f"{_LIBRARY[group]} failed: {type(error).__name__}: {_first_line(error)}")


def _problem(signal: np.ndarray, what: str) -> str | None:
    if not np.isfinite(signal).all():
        return f"the {what} signal has non-finite samples"
    if signal.size == 0:
        return f"the {what} signal is empty"
    return None


def pair_metrics(enhanced: np.ndarray | None, noisy: np.ndarray, clean: np.ndarray, sample_rate_hz: int,
                 groups: Iterable[str] = tuple(METRIC_GROUPS), enhanced_missing: str | None = None,
                 with_noisy: bool = True) -> tuple[dict[str, float | None], str]:
    """Metrics of the enhanced signal and of the noisy input against the clean reference.

    All three are 1-D float arrays at ``sample_rate_hz`` and of one length (the shorter wins). Returns
    ``({column: value or None}, notes)``: columns ``pesq_wb, stoi, ...`` for the enhanced signal and the same
    with ``_noisy`` for the input (those of ``groups`` only; the input's only ``with_noisy``); notes say why
    each ``None`` is undefined, as ``"columns: reason; ..."``. ``enhanced=None`` with ``enhanced_missing`` (the
    reason) leaves the enhanced columns empty.
    """
    groups = tuple(g for g in METRIC_GROUPS if g in set(groups))
    scores = _Scores()
    length = min(noisy.shape[-1], clean.shape[-1], *(() if enhanced is None else (enhanced.shape[-1],)))
    noisy, clean = np.asarray(noisy[:length], np.float32), np.asarray(clean[:length], np.float32)
    clean_problem = _problem(clean, "clean")
    if clean_problem is None and not clean.any():
        clean_problem = "the clean signal is silent (all samples zero)"
    clean_16k = None if clean_problem else resample_for_metrics(clean, sample_rate_hz)
    signals = [("", enhanced, enhanced_missing)] + ([(NOISY_SUFFIX, noisy, None)] if with_noisy else [])
    for suffix, signal, missing in signals:
        if signal is not None:
            signal = np.asarray(signal[:length], np.float32)
            missing = _problem(signal, "enhanced" if not suffix else "noisy")
        if missing is not None or signal is None:
            scores.undefined([name + suffix for g in groups for name in METRIC_GROUPS[g]],
                             missing or "no enhanced signal")
            continue
        _score_signal(scores, suffix, signal, resample_for_metrics(signal, sample_rate_hz), clean, clean_16k,
                      groups, clean_problem)
    return scores.values, scores.notes()
