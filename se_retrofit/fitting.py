"""Putting a state dict into a model with an error a user can act on, not hundreds of key names."""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .messages import few
from .se_block import se_blocks


class WeightsMismatchError(ValueError):
    """A state dict that does not fit the model: keys missing, unexpected, or of the wrong shape."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


_SE_KEY = re.compile(r"(^|\.)se(_\d+)?\.fc[12]\.(weight|bias)$")


def _mismatch_hint(model: nn.Module, missing: list[str], unexpected: list[str], model_keys: set[str]) -> str:
    se_prefixes = tuple(f"{name}." for name, _ in se_blocks(model))
    if missing and se_prefixes and all(k.startswith(se_prefixes) for k in missing) and not unexpected:
        return ("Only SE-block weights are missing: load the base checkpoint before se_retrofit.apply(), "
                "or pass strict=False (the identity-initialised SE blocks keep the model's function).")
    se_keys = [k for k in unexpected if _SE_KEY.search(k)]
    if se_keys and len(se_keys) == len(unexpected) and not se_prefixes:
        return ("The checkpoint holds SE blocks (" + few(se_keys, 2) + "): it is a retrofitted model's. Pass the "
                "base model's weights, load SE runs with se_retrofit.load(run_folder, base_model), or --resume the run.")
    prefixes = {k.split(".", 1)[0] for k in unexpected if "." in k}
    if len(prefixes) == 1:
        prefix = prefixes.pop() + "."
        if all(k[len(prefix):] in model_keys for k in unexpected if k.startswith(prefix)):
            return (f"Every unexpected key starts with {prefix!r}: strip that prefix from the checkpoint's keys "
                    f"({{k.removeprefix({prefix!r}): v for k, v in state.items()}}), or read the file with "
                    "se_retrofit.checkpoint.load_weights(path, model=model), which drops a prefix such as PyTorch "
                    "Lightning's 'model.' where nothing else could be meant.")
    return ("Is this a checkpoint of a different architecture or variant? Check that the model name matches "
            "the one the checkpoint was trained as.")


def load_into(model: nn.Module, weights: Mapping[str, torch.Tensor], *, strict: bool = True):
    """``model.load_state_dict(weights)`` with an error a user can act on.

    PyTorch's own error lists every key, which for a wrong architecture is hundreds of lines; this one
    lists a few of each kind and guesses the cause. Shape mismatches raise even with ``strict=False``
    (as in PyTorch), because silently keeping random weights for a layer is worse than failing; load
    before resizing the classifier, then call ``reset_classifier``.

    Returns PyTorch's ``(missing_keys, unexpected_keys)`` named tuple.

    Raises:
        WeightsMismatchError: (a ``ValueError``) with the keys that are missing, unexpected or of
            another shape, and a hint at the likely cause.
    """
    own = model.state_dict()
    # a batch norm fills in a missing batch count itself (checkpoints from before PyTorch 0.4.1 lack it,
    # torchvision's ImageNet ResNets among them), as load_state_dict(strict=True) accepts
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
    missing = [k for k in own if k not in weights
               and not (k.rpartition(".")[2] == "num_batches_tracked" and k.rpartition(".")[0] in norms)]
    unexpected = [k for k in weights if k not in own]
    mismatched = [(k, tuple(weights[k].shape), tuple(own[k].shape)) for k in own
                  if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"the weights do not fit {type(model).__name__}:"]
        if missing and strict:
            lines.append(f"  missing from the checkpoint: {few(missing)}")
        if unexpected and strict:
            lines.append(f"  not in the model: {few(unexpected)}")
        if mismatched:
            shown = [f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in mismatched]
            lines.append(f"  shape mismatch: {few(shown, 3)}")
        if mismatched and all(k.rsplit(".", 1)[0] == mismatched[0][0].rsplit(".", 1)[0] for k, _, _ in mismatched):
            hint = ("Only one layer differs in shape (often the classifier): create the model with the "
                    "checkpoint's number of classes, load, then reset the classifier.")
        else:
            hint = _mismatch_hint(model, missing, unexpected, set(own))
        lines.append(hint)
        raise WeightsMismatchError("\n".join(lines), missing, unexpected, mismatched)
    return model.load_state_dict(dict(weights), strict=strict)
