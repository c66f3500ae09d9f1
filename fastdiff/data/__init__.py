"""Training data: an image-folder dataset, the embedded shapes dataset, a resumable sharded batch stream."""

from fastdiff.data.image_folder import (
    IMAGE_EXTENSIONS,
    ImageDataError,
    ImageFolderDataset,
    class_labels,
    list_image_files,
    load_image,
)
from fastdiff.data.keys import ItemKey
from fastdiff.data.loader import BatchStream, build_dataset
from fastdiff.data.sampler import DataPosition, ShardedBatchSampler, epoch_order
from fastdiff.data.shapes import SHAPE_CLASSES, ShapesDataset, render_shape

__all__ = [
    "IMAGE_EXTENSIONS",
    "SHAPE_CLASSES",
    "BatchStream",
    "DataPosition",
    "ImageDataError",
    "ImageFolderDataset",
    "ItemKey",
    "ShapesDataset",
    "ShardedBatchSampler",
    "build_dataset",
    "class_labels",
    "epoch_order",
    "list_image_files",
    "load_image",
    "render_shape",
]
