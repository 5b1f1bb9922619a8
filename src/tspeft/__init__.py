"""tspeft: Token-Selective Parameter-Efficient Fine-Tuning on top of peft."""

from .core.adapter import BottleneckConfig
from .core.config import TokenSelectiveConfig
from .core.model import TSPeftModel, get_ts_peft_model

__version__ = "0.1.0"
__all__ = ["BottleneckConfig", "TSPeftModel", "TokenSelectiveConfig", "get_ts_peft_model", "__version__"]
