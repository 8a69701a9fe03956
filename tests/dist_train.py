"""Train the cls stage's classifier with the engine; run under `accelerate launch` by tests/test_distributed.py."""
import json
import sys

import torch.distributed as dist

from wsss_dist.cli import setup_logging
from wsss_dist.config import make_config
from wsss_dist.stages.cls import train_classifier

if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    setup_logging("INFO")
    cfg = make_config(args)
    metrics = train_classifier(cfg, cfg.run_dir / "cls")
    info = {"world": dist.get_world_size() if dist.is_initialized() else 1,
            "backend": dist.get_backend() if dist.is_initialized() else None, **metrics}
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(info, f)
