"""Data: FER2013 (CSV/.gz/.tar.gz), FER+ votes and image folders -> ``FaceDataset`` (cached);
the paper's preprocessing (``to_model_input``, ``paper_jpeg``), Keras-style augmentation on
batches (``warp``, ``augment``) and ``BatchLoader``. See docs/data.md.
"""
from .augment import AugmentConfig, augment, random_matrices
from .cache import default_cache_dir, is_cache, load_cache, save_cache
from .dataset import (CLASSES_FER2013, CLASSES_FERPLUS, SPLITS, BadRecord, FaceDataset,
                      split_code)
from .fer2013 import load_fer2013
from .ferplus import apply_ferplus, ferplus_majority, ferplus_soft_labels, read_ferplus_votes
from .folders import load_image_folder, read_grey_image
from .load import LABEL_SETS, load_dataset
from .loader import BatchLoader
from .preprocess import grey_to_rgb, jpeg_roundtrip, paper_jpeg, resize, resize_uint8, to_model_input
from .stats import DatasetStats, dataset_stats, format_stats, format_table
from .warp import hflip_matrix, rotation_matrix, translation_matrix, warp, zoom_matrix

__all__ = ["AugmentConfig", "augment", "random_matrices", "default_cache_dir", "is_cache",
           "load_cache", "save_cache", "CLASSES_FER2013", "CLASSES_FERPLUS", "SPLITS", "BadRecord",
           "FaceDataset", "split_code", "load_fer2013", "apply_ferplus", "ferplus_majority",
           "ferplus_soft_labels", "read_ferplus_votes", "load_image_folder", "read_grey_image",
           "LABEL_SETS", "load_dataset", "BatchLoader", "grey_to_rgb", "jpeg_roundtrip",
           "paper_jpeg", "resize", "resize_uint8", "to_model_input", "DatasetStats",
           "dataset_stats", "format_stats", "format_table", "hflip_matrix", "rotation_matrix",
           "translation_matrix", "warp", "zoom_matrix"]
