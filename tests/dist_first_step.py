"""One engine step of a deterministic classifier (frozen BN, no dropout) on the toy train stream; writes the step's
mean loss. Run by tests/test_distributed.py on 1 process and under `accelerate launch` on 2."""
import json
import sys

import torch
import torch.distributed as dist

from wsss_dist.config import make_config
from wsss_dist.data.stream import train_loader_for
from wsss_dist.engine import fit
from wsss_dist.methods.losses import multilabel_loss
from wsss_dist.models.backbones import create_backbone
from wsss_dist.models.cam_net import CAMNet

if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    cfg = make_config(args)
    t = cfg.cls.train
    torch.manual_seed(0)
    model = CAMNet(create_backbone("resnet18", frozen_bn=True), num_classes=20, dropout=0.0)

    def loss_fn(model, batch, step):
        return multilabel_loss(model(batch["image"])["logits"].float(), batch["labels"]), {}

    metrics = fit(model=model, param_groups=model.param_groups(cfg.cls.optim.lr, cfg.cls.optim.weight_decay),
                  loss_fn=loss_fn, make_loader=train_loader_for(cfg, t, cfg.cls.split), out_dir=cfg.run_dir / "x",
                  train=t, optim=cfg.cls.optim, log_name="first-step")
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"world": dist.get_world_size() if dist.is_initialized() else 1, **metrics}, f)
