"""CAM-method building blocks: mixing (mixup, FMix, manifold mixup), losses, sub-categories, affinity, random walk."""
