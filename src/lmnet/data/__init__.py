"""Datasets, image and mask reading."""
from lmnet.data.io import (
    IMAGE_SUFFIXES,
    binarize_mask,
    list_images,
    read_array,
    read_mask,
)

__all__ = ["IMAGE_SUFFIXES", "binarize_mask", "list_images", "read_array", "read_mask"]
