"""Data: the webdataset ``ShardDataModule``, the embedded ``shapes`` generator, shard packing."""
from .shard_datamodule import ShardDataModule
from .shapes import CLASS_NAMES, NUM_CLASSES, make_sample, write_shapes_shards

__all__ = ["ShardDataModule", "CLASS_NAMES", "NUM_CLASSES", "make_sample", "write_shapes_shards"]
