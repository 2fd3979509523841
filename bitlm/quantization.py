"""Quantized linear layers for CPU inference (INT8 dynamic, 4-bit grouped), 4-bit QAT, and their size accounting.

Both formats keep their weights as plain tensors, so a quantized model saves to the
save_pretrained layout (safetensors, no pickle) and config.json records how it was quantized:
  int8  per-output-row symmetric int8 weights + fp32 row scales; activations are quantized per
        call (dynamic). Kernel: torch.ao's dynamic quantized linear (fbgemm), else torchao's
        Int8DynamicActivationInt8WeightConfig, chosen by what is installed.
  int4  asymmetric 4-bit weights in groups of `group_size` input columns, two per byte in the
        layout of torch's CPU int4 matmul, with bf16 scales and zeros per group (torchao's
        groupwise quantizer, the numerics its Int4WeightOnlyQATQuantizer trains against).
Everything else (embeddings, norms, biases, layers the int4 kernel cannot take) stays fp32.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from typing import Any, Optional

import torch
from torch import nn

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what torchao's int4 quantizer accepts
_INNER_K_TILES = 2  # the int4 CPU packing's tile: in_features must divide by 32 (every group size does)
_INT4_ROWS = 16  # torch's CPU int4 packing needs out_features % 16 == 0


def int8_backend() -> str:
    """The INT8 kernel this install has: "torch" (torch.ao dynamic quantization), else "torchao"."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear  # noqa: F401 - presence is the test

        if any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "qnnpack")):
            return "torch"
    except ImportError:
        pass
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise RuntimeError("INT8 quantization needs torch.ao's dynamic quantization or torchao "
                           "(pip install 'bitlm[quant]')") from None
    return "torchao"


def _require_torchao(what: str) -> None:
    """Import torchao once, without the lines it logs on a CPU-only machine (its CUDA extensions fail to load)."""
    if "torchao" in sys.modules:
        return
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise RuntimeError(f"{what} needs torchao (pip install 'bitlm[quant]', torchao==0.18.0)") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times fp32 scales; the kernel is built on first use."""

    def __init__(self, in_features: int, out_features: int, *, backend: Optional[str] = None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device))
        self._forget_kernel()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, backend: Optional[str] = None) -> "Int8Linear":
        w = linear.weight.detach().float().cpu()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # symmetric: zero maps to zero exactly
        module = cls(linear.in_features, linear.out_features, backend=backend)
        module.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    def _forget_kernel(self) -> None:
        object.__setattr__(self, "_kernel", None)  # not a submodule: never in state_dict or .modules()

    def _load_from_state_dict(self, *args, **kwargs):
        self._forget_kernel()
        return super()._load_from_state_dict(*args, **kwargs)

    def _build_kernel(self):
        backend = self.backend or int8_backend()
        if backend == "torch":
            from torch.ao.nn.quantized.dynamic import Linear

            with warnings.catch_warnings():  # torch.ao.quantization is deprecated (still its fastest CPU path)
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight.cpu(), self.weight_scale.double().cpu(),
                    torch.zeros(self.out_features, dtype=torch.long), 0)
                kernel = Linear(self.in_features, self.out_features, dtype=torch.qint8)
                kernel.set_weight_bias(qweight, self.bias.cpu())
            return kernel
        _require_torchao("the torchao INT8 backend")
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        kernel = nn.Linear(self.in_features, self.out_features)
        with torch.no_grad():
            kernel.weight.copy_(self.weight.float() * self.weight_scale[:, None])
            kernel.bias.copy_(self.bias)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(kernel, Int8DynamicActivationInt8WeightConfig())
        return kernel.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.device.type != "cpu":
            raise RuntimeError("INT8 dynamic quantization runs on CPU; load the model with device='cpu'")
        if self._kernel is None:
            object.__setattr__(self, "_kernel", self._build_kernel())
        return self._kernel(x.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """y = x W^T + b with W in 4-bit groups (packed uint8) and bf16 scales/zeros; CPU only."""

    def __init__(self, in_features: int, out_features: int, *, group_size: int = 32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2,
                                                             dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = 32) -> "Int4Linear":
        _require_torchao("4-bit quantization")
        from torchao.quantization.utils import groupwise_affine_quantize_tensor

        w = linear.weight.detach().cpu().to(torch.bfloat16)  # the precision torchao's QAT fake-quantizes in
        values, scales_and_zeros = groupwise_affine_quantize_tensor(w, 4, group_size)  # int32 in [0, 15]
        module = cls(linear.in_features, linear.out_features, group_size=group_size)
        module.weight.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, _INNER_K_TILES))
        module.scales_and_zeros.copy_(scales_and_zeros)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.device.type != "cpu":
            raise RuntimeError("the 4-bit weights are packed for torch's CPU int4 kernel; load with device='cpu'")
        _require_torchao("4-bit inference")
        from torchao.quantization.linear_quant_modules import linear_forward_int4

        return linear_forward_int4(x, self.weight, self.scales_and_zeros, self.out_features, self.group_size) \
            + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4, group_size={self.group_size}"


def int4_eligible(linear: nn.Linear, group_size: int) -> bool:
    """Whether torch's CPU int4 kernel can take this layer's shape (others stay fp32)."""
    return linear.in_features % group_size == 0 and linear.out_features % _INT4_ROWS == 0


def _replace_linears(model: nn.Module, make) -> None:
    """Swap every nn.Linear for make(linear) where that returns a module (None keeps the layer)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                new = make(child)
                if new is not None:
                    setattr(parent, name, new)


def _checked_group_size(group_size: int) -> int:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    return group_size


def quantize_dynamic(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """An INT8 copy of `model` for CPU inference: every linear layer int8-weighted, activations quantized per call."""
    backend = backend or int8_backend()
    if backend not in ("torch", "torchao"):
        raise ValueError(f"backend must be 'torch' or 'torchao', got {backend!r}")
    out = copy.deepcopy(getattr(model, "_orig_mod", model)).float().cpu().eval()
    _replace_linears(out, lambda lin: Int8Linear.from_linear(lin, backend=backend))
    out.quantization = {"method": "int8"}
    return out


def quantize_int4(model: nn.Module, *, group_size: int = 32) -> nn.Module:
    """A 4-bit copy of `model` (QAT-trained or not) for CPU inference: real packed 4-bit weights + group scales."""
    group_size = _checked_group_size(group_size)
    out = copy.deepcopy(getattr(model, "_orig_mod", model)).float().cpu().eval()
    _replace_linears(out, lambda lin: Int4Linear.from_linear(lin, group_size=group_size)
                     if int4_eligible(lin, group_size) else None)
    out.quantization = {"method": "int4", "group_size": group_size}
    return out


def prepare_qat(model: nn.Module, group_size: int = 32) -> nn.Module:
    """Fake-quantize the weights of the 4-bit-eligible linear layers in place (torchao's int4 QAT numerics).

    The layers keep their Parameters and state-dict names, so checkpoints, the optimizer and
    `quantize_int4` afterwards see an ordinary model.
    """
    group_size = _checked_group_size(group_size)
    _require_torchao("4-bit QAT (train.qat)")
    from torchao.quantization.qat.linear import Int4WeightOnlyQATLinear

    def fake_quantized(lin: nn.Linear):
        if not int4_eligible(lin, group_size) or isinstance(lin, Int4WeightOnlyQATLinear):
            return None
        new = Int4WeightOnlyQATLinear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      groupsize=group_size, inner_k_tiles=_INNER_K_TILES,
                                      precision=lin.weight.dtype, device=lin.weight.device)
        new.weight, new.bias = lin.weight, lin.bias
        return new

    _replace_linears(model, fake_quantized)
    return model


def check_spec(spec: Any, source: Any = "config.json") -> dict[str, Any]:
    """The quantization record of a config.json, validated; ValueError naming `source` otherwise."""
    if not isinstance(spec, dict) or spec.get("method") not in METHODS:
        raise ValueError(f"{source}: 'quantization' must be an object with method one of {METHODS}, got {spec!r}")
    allowed = {"int8": {"method"}, "int4": {"method", "group_size"}}[spec["method"]]
    if extra := set(spec) - allowed:
        raise ValueError(f"{source}: 'quantization' has unknown keys {sorted(extra)}")
    if spec["method"] == "int4" and spec.get("group_size") not in GROUP_SIZES:
        raise ValueError(f"{source}: quantization.group_size must be one of {GROUP_SIZES}, got {spec.get('group_size')!r}")
    return dict(spec)


def build_quantized(config, spec: dict[str, Any]) -> nn.Module:
    """An empty quantized BitTransformerLM of `config` (weights to be loaded); works on the meta device too."""
    from .model import BitTransformerLM

    spec = check_spec(spec)
    model = BitTransformerLM(config)
    if spec["method"] == "int8":
        _replace_linears(model, lambda lin: Int8Linear(lin.in_features, lin.out_features, device=lin.weight.device))
    else:
        g = spec["group_size"]
        _replace_linears(model, lambda lin: Int4Linear(lin.in_features, lin.out_features, group_size=g,
                                                       device=lin.weight.device) if int4_eligible(lin, g) else None)
    model.quantization = spec
    return model.eval()


def storage_report(model: nn.Module) -> dict[str, Any]:
    """Bytes and bits per weight of what save_pretrained stores for `model` (any format).

    linear_bits_per_weight: stored bits of every linear layer's weight tensors (scales and zeros
    included, biases not) per weight; quantized_bits_per_weight: the same over the quantized layers
    only; bits_per_parameter: every stored tensor per parameter of the fp32 model.
    """
    model = getattr(model, "_orig_mod", model)
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    linear, quantized = [0, 0], [0, 0]  # [weights, stored bytes]
    n_params = 0
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            n = module.in_features * module.out_features
            stored = sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if k != "bias")
            quantized = [quantized[0] + n, quantized[1] + stored]
            linear = [linear[0] + n, linear[1] + stored]
            n_params += n + module.out_features
        elif isinstance(module, nn.Linear):
            linear = [linear[0] + module.weight.numel(), linear[1] + module.weight.numel() * module.weight.element_size()]
    n_params += sum(p.numel() for p in model.parameters())
    return {
        "method": (getattr(model, "quantization", None) or {"method": "fp32"})["method"],
        "n_bytes": n_bytes,
        "n_parameters": n_params,
        "bits_per_parameter": 8 * n_bytes / n_params,
        "linear_bits_per_weight": 8 * linear[1] / linear[0],
        "quantized_bits_per_weight": 8 * quantized[1] / quantized[0] if quantized[0] else None,
        "quantized_weight_share": quantized[0] / linear[0],
    }
