"""se_retrofit: Squeeze-and-Excitation for any trained timm or torchvision CNN, in one call."""
from .adapter import load, save_adapter, se_state_dict
from .api import SERetrofitWarning, Site, SitePlan, Skipped, apply, find_sites, get_config, get_plan
from .catalog import register_channel_attention
from .checkpoint import UnsafeCheckpointError
from .config import SEConfig
from .finetune import FinetuneResult, finetune
from .report import Report, report
from .se_block import SEBlock, se_blocks

__version__ = "0.1.0"

__all__ = [
    "SEBlock", "SEConfig", "SERetrofitWarning", "Report", "Site", "SitePlan", "Skipped", "UnsafeCheckpointError", "FinetuneResult", "apply",
    "find_sites", "finetune", "get_config", "get_plan", "load", "register_channel_attention", "report", "save_adapter", "se_blocks",
    "se_state_dict", "__version__",
]
