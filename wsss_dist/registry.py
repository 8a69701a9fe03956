"""The method registry: one entry per CAM method, read by the config, the cls stage and the launcher.

An entry says how the method mixes its inputs, where its sub-categories come from, whether it trains in
rounds and which extra stages it needs. Adding a method is one :func:`register_method` entry here plus its
mixing function or loss in :mod:`wsss_dist.methods`. This module imports nothing of the package (the config,
at the bottom layer, reads it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Mix = Optional[Literal["mixup", "fmix", "manifold"]]
SubSource = Optional[Literal["rounds", "teacher"]]


@dataclass(frozen=True)
class Method:
    """One CAM method: its mixing, its sub-category source, its extra stages."""

    name: str
    doc: str
    mix: Mix = None  # None: plain batches; mixup/fmix: input mixing; manifold: feature mixing inside the backbone
    subcategories: SubSource = None  # rounds: clustered features of the previous round (SC-CAM); teacher: ViT embeddings
    extra_stages: tuple[str, ...] = ()  # stages that only this method runs (before cls)

    @property
    def rounds(self) -> bool:
        """Whether cls trains in rounds (``cls.sc_rounds``), one job per round."""
        return self.subcategories == "rounds"

    @property
    def mixes(self) -> bool:
        """Whether the loss is the mixed (λ-weighted) objective with entropy and concentration terms."""
        return self.mix is not None


def _table(*methods: Method) -> dict[str, Method]:
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = _table(
    Method("cam", "plain CAM: multi-label soft-margin loss"),
    Method("mixup", "Mixup-CAM: input mixup + entropy and concentration losses", mix="mixup"),
    Method("fmix", "FMix-CAM: an FMix mask mixes the inputs + entropy and concentration losses", mix="fmix"),
    Method("manifold", "manifold mixup: features mixed after a random backbone stage", mix="manifold"),
    Method("sc", "Sub-category Exploration: rounds of train → cluster pooled features → train", subcategories="rounds"),
    Method("teach", "Sub-category Teaching: FINCH on a fine-tuned ViT teacher's embeddings", subcategories="teacher",
           extra_stages=("teacher",)),
)
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]  # the config's type of ``method``: the registry's names


BACKBONES: tuple[str, ...] = ("resnet38d",)
# Classifier heads of ImageNet/psa/deeplab-pytorch checkpoints that a backbone never has: optional when loading
HEAD_PREFIXES: tuple[str, ...] = ("fc.", "fc8.", "linear1000.", "head.", "classifier.", "aspp.")  # our own backbones (wsss_dist/models); any other name is a timm model


def get_method(name: str) -> Method:
    """The registry entry of ``name`` (KeyError naming the allowed methods)."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; allowed: {', '.join(METHOD_NAMES)}") from None
