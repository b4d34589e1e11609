"""Backbones, LHC insertion and the model registry."""
from .backbones import PreActResNet, resnet18v2_48, resnet34v2
from .lhcnet import (PAPER_BLOCKS, PAPER_GATES, LHCBlock, freeze_except_gates, gate_parameters,
                     insert_lhc, lhc_blocks, replace_lhc_block, set_batchnorm_eval, switch_off_lhc)
from .registry import (COMPACT_BLOCKS, LHCNetModel, create_model, list_models, load_backbone_weights, load_model,
                       model_spec, read_model_metadata, save_model)

__all__ = ["PreActResNet", "resnet18v2_48", "resnet34v2", "PAPER_BLOCKS", "PAPER_GATES", "LHCBlock",
           "freeze_except_gates", "gate_parameters", "insert_lhc", "lhc_blocks", "replace_lhc_block",
           "set_batchnorm_eval", "switch_off_lhc",
           "COMPACT_BLOCKS", "LHCNetModel", "create_model", "list_models", "load_backbone_weights", "load_model",
           "model_spec", "read_model_metadata", "save_model"]
