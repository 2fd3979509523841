"""bitlm: bit-native language models — codec, model, telemetry, training engine and sampling.

This package never imports ray or mlflow; the orchestration layers (pipelines/, tune/, serve/)
build on it. Only bitlm.cli reaches them, lazily, inside commands.
"""

from .checkpoint import from_pretrained, load_checkpoint, save_checkpoint, save_pretrained
from .codec import bits_to_bytes, bits_to_text, bytes_to_bits, enforce_parity, pack_bits, text_to_bits, unpack_bits
from .compression import compress_bits, decompress_bits
from .config import ExperimentConfig, ModelConfig, TrainConfig, apply_overrides
from .data import ByteWindows, Corpus, prepare_corpus
from .engine import FitResult, fit
from .evaluation import evaluate_text
from .model import BitTransformerLM
from .diffusion import diffusion_sample
from .safety import SafetyBlocked, SafetyConfig, SafetyGate, hil_safe_inference, safe_sample_with_retry
from .sampling import generate, infer_long_sequence, sample_text
from .telemetry import detect_metric_drift, lz_complexity, negentropy, symbiosis

__version__ = "0.1.0"

__all__ = [
    "BitTransformerLM", "ByteWindows", "Corpus", "ExperimentConfig", "FitResult", "ModelConfig", "TrainConfig",
    "SafetyBlocked", "SafetyConfig", "SafetyGate", "hil_safe_inference", "safe_sample_with_retry", "diffusion_sample",
    "compress_bits", "decompress_bits",
    "apply_overrides", "bits_to_bytes", "bits_to_text", "bytes_to_bits", "detect_metric_drift", "enforce_parity",
    "evaluate_text", "fit", "from_pretrained", "generate", "infer_long_sequence", "load_checkpoint",
    "lz_complexity", "negentropy", "pack_bits", "prepare_corpus", "sample_text", "save_checkpoint",
    "save_pretrained", "symbiosis", "text_to_bits", "unpack_bits",
]
