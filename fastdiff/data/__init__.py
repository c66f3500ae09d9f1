"""Training data: image decoding rules, an image-folder dataset, the embedded shapes dataset, a resumable
sharded batch stream."""

from fastdiff.data.image_folder import IMAGE_EXTENSIONS, ImageFolderDataset, class_labels, list_image_files
from fastdiff.data.images import ImageDataError, ImageSize, image_size_of, load_image, to_model_range
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
    "ImageSize",
    "ItemKey",
    "ShapesDataset",
    "ShardedBatchSampler",
    "build_dataset",
    "class_labels",
    "epoch_order",
    "image_size_of",
    "list_image_files",
    "load_image",
    "render_shape",
    "to_model_range",
]
