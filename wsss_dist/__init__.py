"""wsss-dist: image-level weakly supervised semantic segmentation on Pascal VOC, from a workstation to SLURM."""

__version__ = "0.1.0"
