"""lhcnet: LHC-Net (Local multi-Head Channel self-attention, arXiv 2111.07224) in PyTorch."""
from .models import (create_model, freeze_except_gates, insert_lhc, list_models, load_model,
                     save_model)
from .nn import LHC

__version__ = "0.1.0"
__all__ = ["LHC", "Predictor", "create_model", "freeze_except_gates", "insert_lhc", "list_models",
           "load_model", "save_model", "__version__"]


def __getattr__(name: str):
    """``lhcnet.Predictor`` on first use: ``import lhcnet`` does not load OpenCV."""
    if name == "Predictor":
        from .predict import Predictor
        return Predictor
    raise AttributeError(f"module 'lhcnet' has no attribute {name!r}")
