"""Fingerprints of a model's weights: which base an SE adapter was trained on, and what changed since ``apply``.

An SE adapter is only as good as the backbone under it. `base_fingerprint` (one digest of every tensor
outside the adapter) is what `load` checks a new base against; `tensor_digests` (one per tensor) is what
``apply`` records, so that `save_adapter` can say which backbone tensors training moved (batch-norm
running statistics update in a training-mode forward even with ``requires_grad=False``), which the
adapter alone would not reproduce on the base it was made for.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

import torch
from torch import nn

# The attribute ``apply`` keeps the per-tensor digests of the model it returned under.
DIGESTS_ATTR = "_se_retrofit_base_digests"


def _tensors(model: nn.Module, left_out: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s state-dict tensors outside the modules ``left_out``, by name; entries that are not
    tensors (a module's ``get_extra_state``, packed quantized weights) are not weights to compare."""
    prefixes = tuple(f"{name}." for name in left_out)
    for key, value in sorted(model.state_dict().items()):
        if isinstance(value, torch.Tensor) and not key.startswith(prefixes):
            yield key, value


def _update(digest: "hashlib._Hash", key: str, value: torch.Tensor) -> None:
    tensor = value.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{key}|{tensor.dtype}|{tuple(value.shape)}|".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes())


def digest_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One SHA-256 of named tensors (names, dtypes, shapes, values), in the order given."""
    digest = hashlib.sha256()
    for key, value in tensors:
        _update(digest, key, value)
    return digest.hexdigest()


def base_fingerprint(model: nn.Module, left_out: Iterable[str], without: Iterable[str] = ()) -> str:
    """SHA-256 of every tensor of ``model`` outside the modules ``left_out`` (the SE blocks, the saved head):
    the base weights the adapter was trained on, which `load` checks, since SE blocks trained on one
    backbone's features are wrong on another's (other pretrained weights, another checkpoint). ``without``
    names tensors to leave out as well: the ones that changed since ``apply``, so that `load` can tell
    a base that differs in those alone."""
    skipped = set(without)
    return digest_tensors((key, value) for key, value in _tensors(model, left_out) if key not in skipped)


def tensor_digests(model: nn.Module, left_out: Iterable[str]) -> dict[str, str]:
    """``dtype:SHA-256`` of each tensor of ``model`` outside the modules ``left_out``, by state-dict name."""
    out = {}
    for key, value in _tensors(model, left_out):
        digest = hashlib.sha256()
        _update(digest, key, value)
        out[key] = f"{str(value.dtype).removeprefix('torch.')}:{digest.hexdigest()}"
    return out


def changed_since_apply(model: nn.Module, left_out: Iterable[str]) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """The tensors outside ``left_out`` that differ from when ``apply`` returned ``model``: the names of those
    whose values changed in their dtype, or that were added or removed since (a head swapped for an
    ``nn.Sequential(nn.Dropout(), nn.Linear())``: its keys change), and (old dtype, new dtype) by name of
    those converted to another (``model.half()``). Both empty where ``apply`` recorded nothing."""
    recorded = model.__dict__.get(DIGESTS_ATTR)
    if not recorded:
        return [], {}
    changed, converted = [], {}
    current = tensor_digests(model, left_out)
    prefixes = tuple(f"{name}." for name in left_out)
    changed += [key for key in recorded if key not in current and not key.startswith(prefixes)]
    for key, now in current.items():
        then = recorded.get(key)
        if then is None:
            changed.append(key)
            continue
        if then == now:
            continue
        old_dtype, new_dtype = then.partition(":")[0], now.partition(":")[0]
        if old_dtype != new_dtype:
            converted[key] = (old_dtype, new_dtype)
        else:
            changed.append(key)
    return changed, converted
