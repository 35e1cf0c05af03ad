"""Attention vs pure convolution: probes on denoisers built with the planned attention or none.

The parameter count of every denoiser is reported next to its Dice (CSV, table, figure legend),
so a difference in Dice can be weighed against capacity.
"""

from __future__ import annotations

from diffprobe.workflows.ablations.model_comparison import compare_models, ensure_model
from diffprobe.workflows.ablations.sweep import AblationResult, SweepConfig

ATTENTION_ORDER = ("planned", "none")


def backbone_model_name(attention: str, guidance: str = "bpr") -> str:
    return f"ablate_attn_{attention}" + ("" if guidance == "bpr" else f"__{guidance}")


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def ablate_backbone(config: SweepConfig, models: list[str] | None = None, pretrain_missing: bool = False,
                    guidance: str = "bpr") -> AblationResult:
    """Probe denoisers with the planned attention vs pure convolution; reports parameter counts.

    ``pretrain_missing``: every model named ``ablate_attn_<attention>[__<guidance>]`` is
    pretrained (``config.pretrain_overrides``) when missing (no suffix: bpr
    guidance). Without ``models``, the pair ``ablate_attn_planned`` / ``ablate_attn_none``
    (suffixed ``__<guidance>`` when ``guidance`` is not bpr) is compared.
    """
    from diffprobe.pretraining.data import GUIDANCE_MODES

    models = list(models or [])
    if pretrain_missing:
        if not models:
            models = [backbone_model_name(a, guidance) for a in ATTENTION_ORDER]
        own = {backbone_model_name(a, g): (a, g) for a in ATTENTION_ORDER for g in GUIDANCE_MODES}
        for name in models:
            if name in own:
                attention, mode = own[name]
                ensure_model(config, name, mode, attention)
    return compare_models("backbone", config, models,
                          lambda i: f"{i['model']} (attention {i['attention']}, {_millions(i['parameters'])})",
                          ["model", "attention", "guidance", "parameters"])
