"""Every global random generator's state, saved with a checkpoint so that a resumed run continues the
same random streams (augmentation, dropout, the data order of a single process)."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in types ``torch.load(weights_only=True)`` accepts.

    numpy's state holds an ndarray and Python's a tuple of ints; both are turned into tensors and plain
    lists here so that a resumed run can use the safe loader and still continue the same random stream.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured; generators it does not mention are left alone.

    CUDA states are restored for as many devices as both the checkpoint and this machine have, so a
    run resumed on fewer GPUs still starts.
    """
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    if "numpy" in state:
        np_state = state["numpy"]
        keys = np.asarray(torch.as_tensor(np_state["keys"]).numpy(), dtype=np.uint32)
        np.random.set_state((np_state["kind"], keys, int(np_state["pos"]),
                             int(np_state["has_gauss"]), float(np_state["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_state, dtype=torch.uint8).cpu(), device)
