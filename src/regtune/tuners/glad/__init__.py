from regtune._compat import register_regtune_method

from .config import GLADConfig
from .model import GLADModel
from .settings import GLADSettings


__all__ = ["GLADConfig", "GLADModel", "GLADSettings"]

register_regtune_method(name="glad", config_cls=GLADConfig, model_cls=GLADModel, prefix="lora_")
