"""Data: VOC/SBD readers, the toy generator, shard packing and the WebDataset streams."""
