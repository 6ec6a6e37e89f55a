"""se_retrofit: Squeeze-and-Excitation for any trained timm or torchvision CNN, in one call.

The public names are imported on first use (PEP 562), so that ``import se_retrofit`` and the
``se-retrofit`` command's ``--help`` do not pay for importing torch, torchvision and timm (seconds);
``from se_retrofit import apply`` and ``se_retrofit.apply`` work as with eager imports.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "load": "adapter", "save_adapter": "adapter", "se_state_dict": "adapter",
    "SERetrofitWarning": "api", "Site": "api", "SitePlan": "api", "Skipped": "api", "apply": "api",
    "find_sites": "api", "get_config": "api", "get_plan": "api",
    "register_channel_attention": "catalog",
    "UnsafeCheckpointError": "checkpoint",
    "SEConfig": "config",
    "FinetuneResult": "finetune", "finetune": "finetune",
    "BlockCost": "report", "Report": "report", "report": "report",
    "SEBlock": "se_block", "se_blocks": "se_block",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from .adapter import load, save_adapter, se_state_dict
    from .api import SERetrofitWarning, Site, SitePlan, Skipped, apply, find_sites, get_config, get_plan
    from .catalog import register_channel_attention
    from .checkpoint import UnsafeCheckpointError
    from .config import SEConfig
    from .finetune import FinetuneResult, finetune
    from .report import BlockCost, Report, report
    from .se_block import SEBlock, se_blocks


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'se_retrofit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps ``se_retrofit.report`` and ``se_retrofit.finetune`` the functions, as eager imports left them.

    Importing a submodule binds it on its package under its own name; for the two submodules named
    like the function they export, that would replace the function with the module.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            self.__dict__.pop(name, None)  # the next lookup goes through __getattr__ to the function
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
