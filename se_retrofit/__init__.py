"""se_retrofit: Squeeze-and-Excitation for any trained timm or torchvision CNN, in one call."""
from .api import SERetrofitWarning, Site, SitePlan, Skipped, apply, find_sites, get_config, get_plan
from .catalog import register_channel_attention
from .config import SEConfig
from .se_block import SEBlock, se_blocks

__version__ = "0.1.0"

__all__ = [
    "SEBlock", "SEConfig", "SERetrofitWarning", "Site", "SitePlan", "Skipped", "apply", "find_sites",
    "get_config", "get_plan", "register_channel_attention", "se_blocks", "__version__",
]
