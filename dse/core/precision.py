"""Precision transform, shared by the study and the deployment runtime through :mod:`dse.core.build`.

Import-light on purpose (torch only): the runtime rebuilds a bundle's module
structure with exactly the function the study used to make it.
"""
from __future__ import annotations

import copy
import warnings

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}


def apply_precision(model: torch.nn.Module, precision: str, in_place: bool = False) -> torch.nn.Module:
    """The deployed form of ``model`` for ``precision`` (a copy unless ``in_place``).

    bf16/fp16 cast every weight; int8 is dynamic quantisation of every ``Linear``
    (qint8 weights, activations quantised per call) with ``torch.ao``'s
    ``quantize_dynamic``; ``amp-*`` keeps fp32 weights (autocast happens at run time).
    """
    if not in_place:
        model = copy.deepcopy(model)
    model = model.eval()
    if precision in DTYPES:
        return model.to(DTYPES[precision])
    if precision == "int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation
            from torch.ao.quantization import quantize_dynamic
            return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    if precision in AUTOCAST:
        return model
    raise ValueError(f"precision {precision!r} is not one of {', '.join([*DTYPES, 'int8', *AUTOCAST])}")


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (possibly nested) state-dict value, packed int8 weights included."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


def weight_mib(model: torch.nn.Module) -> float:
    """MiB of the model's weights in their deployed form (state dict tensors)."""
    return tensor_bytes(dict(model.state_dict())) / 2**20
