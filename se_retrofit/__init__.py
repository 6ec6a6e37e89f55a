"""se_retrofit: Squeeze-and-Excitation for any trained timm or torchvision CNN, in one call."""
from .config import SEConfig
from .se_block import SEBlock, se_blocks

__version__ = "0.1.0"

__all__ = ["SEBlock", "SEConfig", "se_blocks", "__version__"]
