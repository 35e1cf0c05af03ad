"""What the position input is worth: probes on models pretrained with guidance none / random / physical / BPR.

All models share the dataset's plans, the seed and the budget, so guidance is the only difference; each model's
mode is read from its ``model.json``. With ``pretrain_missing`` one call runs the whole
ablation: the models ``ablate_<mode>`` are pretrained first when missing.
"""

from __future__ import annotations

from diffprobe.workflows.ablations.model_comparison import compare_models, ensure_model
from diffprobe.workflows.ablations.sweep import AblationResult, SweepConfig

GUIDANCE_ORDER = ("none", "random", "physical", "bpr")  # the paper's progression


def ablate_guidance(config: SweepConfig, models: list[str] | None = None, pretrain_missing: bool = False,
                    modes: list[str] | None = None) -> AblationResult:
    """Probe pretrained models that differ in guidance (read from each model.json).

    ``pretrain_missing``: every model named ``ablate_<mode>`` is pretrained with that guidance
    (``config.pretrain_overrides``) when missing (resumed when interrupted).
    Without ``models`` (or with ``modes``) the models ``ablate_<mode>`` for ``modes`` (default:
    none, random, physical, bpr) are compared, plus any ``models`` given.
    """
    from diffprobe.pretraining.data import GUIDANCE_MODES

    models = list(models or [])
    if pretrain_missing:
        if modes is not None or not models:
            own = [f"ablate_{m}" for m in (modes or GUIDANCE_ORDER)]
            models = own + [m for m in models if m not in own]
        for name in models:
            mode = name[len("ablate_"):] if name.startswith("ablate_") else None
            if mode in GUIDANCE_MODES:
                ensure_model(config, name, mode, "planned")
    return compare_models("guidance", config, models, lambda i: f"{i['model']} (guidance {i['guidance']})",
                          ["model", "guidance", "attention", "parameters"])
