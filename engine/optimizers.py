"""Optimizers: how each is built (measure, the traced estimate and the exported script share
``make_optimizer``) and how many bytes of state it keeps (the analytic estimate's ``state_bytes``).

What each keeps per trainable parameter tensor after its first step (read from the libraries):

* ``adamw`` (``torch.optim.AdamW``, torch's defaults): ``exp_avg`` and ``exp_avg_sq`` in the
  parameter's dtype, and a 0-dim fp32 ``step`` tensor on the CPU (not on the GPU unless
  capturable/fused).
* ``sgd`` (``torch.optim.SGD``, lr 1e-3, momentum 0.9): one ``momentum_buffer`` in the parameter's
  dtype (a clone of the first gradient).
* ``adamw-8bit`` / ``paged-adamw-8bit`` (``bitsandbytes.optim.AdamW8bit`` / ``PagedAdamW8bit``):
  tensors of at least ``min_8bit_size`` (4096) elements keep two uint8 states and two fp32 absmax
  vectors (one per block of 256); smaller ones two fp32 states. The two 256-entry fp32 quantization
  maps are one pair shared by every parameter. Paged: on CUDA the uint8 states of tensors with at
  least 1e5 elements live in CUDA managed memory (``cudaMallocManaged``), outside torch's caching
  allocator: they are not in ``max_memory_allocated`` and can be paged out to host memory.
* ``lion`` (``bitsandbytes.optim.Lion``, 32-bit): one fp32 state.
* ``adafactor`` (``transformers.Adafactor``, relative step, no first moment): a matrix keeps its
  factored second moment (row and column vectors, fp32), a vector the full one; plus a 0-dim
  fp32 ``RMS`` tensor on the parameter's device.

Sources: ``torch/optim/adamw.py``, ``torch/optim/sgd.py``, ``bitsandbytes/optim/optimizer.py``
(``Optimizer2State.init_state``, ``Optimizer1State.init_state``, ``get_state_buffer``),
``transformers/optimization.py`` (``Adafactor.step``).
"""

from __future__ import annotations

import math
from typing import Iterable

OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "adafactor", "sgd", "lion")

LABELS = {"adamw": "AdamW (torch)", "adamw-8bit": "AdamW 8-bit (bitsandbytes)",
          "paged-adamw-8bit": "Paged AdamW 8-bit (bitsandbytes)",
          "adafactor": "Adafactor (transformers)", "sgd": "SGD, momentum 0.9", "lion": "Lion (bitsandbytes)"}

#: Optimizers that come from bitsandbytes.
BNB_OPTIMIZERS = ("adamw-8bit", "paged-adamw-8bit", "lion")

SGD_MOMENTUM = 0.9
#: bitsandbytes' defaults (``Optimizer2State``): smaller tensors keep 32-bit state; absmax blocks;
#: paged buffers from this many elements on.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
BNB_PAGED_MIN = 100_000
BNB_QMAP_BYTES = 256 * 4


def bitsandbytes_missing(quick: bool = False) -> str:
    """Why bitsandbytes cannot be used here ("" when it imports). ``quick``: only look for the
    package (no import of torch: the app's start-up)."""
    if quick:
        import importlib.util

        found = importlib.util.find_spec("bitsandbytes") is not None
        return "" if found else "bitsandbytes is not installed here"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an import of a native library fails in many ways
        from engine.errors import exception_line

        return f"bitsandbytes is not installed here ({exception_line(exc, 120)})"
    return ""


def unavailable(name: str, quick: bool = False) -> str:
    """Why the optimizer cannot run here ("" when it can): the estimate works regardless."""
    if name in BNB_OPTIMIZERS:
        why = bitsandbytes_missing(quick) if quick else bitsandbytes_missing()
        return f"{name} needs bitsandbytes: {why}" if why else ""
    return ""


def make_optimizer(name, params):
    """The named optimizer over ``params`` with the settings Headroom measures (torch's defaults
    for AdamW; foreach on CUDA as torch picks). Torch, transformers and bitsandbytes only: the
    exported script embeds this function."""
    import torch

    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if name == "adafactor":
        from transformers import Adafactor

        return Adafactor(params, lr=None, relative_step=True, scale_parameter=True, warmup_init=False)
    import bitsandbytes as bnb

    if name == "adamw-8bit":
        return bnb.optim.AdamW8bit(params)
    if name == "paged-adamw-8bit":
        return bnb.optim.PagedAdamW8bit(params)
    if name == "lion":
        return bnb.optim.Lion(params, lr=1e-4)
    raise ValueError(f"unknown optimizer {name!r}")


def _round(n: int, cuda: bool) -> int:
    from engine.estimate.allocator import round_size

    return round_size(n) if (cuda and n > 0) else n


def tensor_states(name: str, shape: tuple[int, ...], elt: int, cuda: bool) -> list[int]:
    """Bytes of each state tensor the optimizer keeps on the device for one parameter tensor of
    ``shape`` and element size ``elt`` (CUDA: 512-byte allocator blocks; shared maps excluded)."""
    n = math.prod(shape)
    if name == "adamw":
        out = [n * elt, n * elt]
        if not cuda:
            out.append(4)  # the fp32 step counter lives on the CPU
    elif name == "sgd":
        out = [n * elt]
    elif name in ("adamw-8bit", "paged-adamw-8bit"):
        if n < BNB_MIN_8BIT_SIZE:
            out = [n * 4, n * 4]
        else:
            blocks = -(-n // BNB_BLOCK)
            paged = name == "paged-adamw-8bit" and cuda and n >= BNB_PAGED_MIN
            out = ([] if paged else [n, n]) + [blocks * 4, blocks * 4]
    elif name == "lion":
        out = [n * 4]
    elif name == "adafactor":
        if len(shape) >= 2:
            out = [math.prod(shape[:-1]) * 4, math.prod(shape[:-2] + shape[-1:]) * 4]
        else:
            out = [n * 4]
        out.append(4)  # RMS: a 0-dim fp32 tensor (of the fp32 copy of the parameter)
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    return [_round(x, cuda) for x in out]


def shared_state_bytes(name: str, tensors: Iterable[tuple[tuple[int, ...], int]], cuda: bool) -> int:
    """State shared by every parameter: bitsandbytes' quantization maps (once 8-bit state exists)."""
    if name in ("adamw-8bit", "paged-adamw-8bit") and any(
            math.prod(s) >= BNB_MIN_8BIT_SIZE for s, _ in tensors):
        return 2 * _round(BNB_QMAP_BYTES, cuda)
    return 0


def state_bytes(name: str, tensors: Iterable[tuple[tuple[int, ...], int]], cuda: bool) -> int:
    """Bytes of optimizer state on the device after the first step, for trainable parameter
    tensors given as (shape, element size)."""
    tensors = list(tensors)
    return sum(sum(tensor_states(name, s, e, cuda)) for s, e in tensors) + \
        shared_state_bytes(name, tensors, cuda)


def managed_bytes(name: str, tensors: Iterable[tuple[tuple[int, ...], int]], cuda: bool) -> int:
    """Paged states in CUDA managed memory (outside torch's allocator)."""
    if name != "paged-adamw-8bit" or not cuda:
        return 0
    return sum(2 * math.prod(s) for s, _ in tensors
               if math.prod(s) >= max(BNB_PAGED_MIN, BNB_MIN_8BIT_SIZE))


def step_temporary_bytes(name: str, tensors: list[tuple[tuple[int, ...], int]], cuda: bool) -> int:
    """Transient bytes inside ``optimizer.step()`` beyond the states (the analytic estimate)."""
    if not tensors:
        return 0
    sizes = [math.prod(s) * e for s, e in tensors]
    if name == "adamw":
        # foreach (CUDA): _foreach_sqrt(exp_avg_sqs), one group's worth; for-loop (CPU): two of the
        # largest tensor's fp32 temporaries
        largest = max(math.prod(s) for s, _ in tensors)
        return sum(_round(x, cuda) for x in sizes) if cuda else 2 * _round(largest * 4, cuda)
    if name == "adafactor":
        # per parameter, one at a time: the squared gradient + eps and the update (fp32)
        largest = max(math.prod(s) for s, _ in tensors)
        return 2 * _round(largest * 4, cuda)
    if name in BNB_OPTIMIZERS and not cuda:
        # the CPU backend dequantizes the states of one tensor (fp32) while it updates it
        largest = max(math.prod(s) for s, _ in tensors)
        return 2 * _round(largest * 4, cuda)
    return 0  # SGD updates in place; bitsandbytes' CUDA kernels update in place


def held_state_bytes(optimizer, block: int = 0) -> int:
    """What an optimizer really holds: bytes of the distinct storages of its state tensors (meta
    tensors, which have no addresses, by tensor; ``block``: round each up to it, as CUDA does)."""
    import torch

    seen: dict = {}
    for state in optimizer.state.values():
        for v in state.values():
            if not isinstance(v, torch.Tensor) or getattr(v, "_headroom_managed", False):
                continue  # a paged buffer in CUDA managed memory (the traced estimate's)
            key = id(v) if v.is_meta else (str(v.device), v.untyped_storage().data_ptr())
            n = v.untyped_storage().nbytes()
            seen[key] = -(-n // block) * block if block and n else n
    return sum(seen.values())


__all__ = ["BNB_OPTIMIZERS", "LABELS", "OPTIMIZERS", "held_state_bytes", "make_optimizer",
           "managed_bytes", "shared_state_bytes", "state_bytes", "step_temporary_bytes",
           "tensor_states", "unavailable"]
