"""The paper's experiments as commands: feature timesteps, guidance, backbone; timestep tuning.

Every experiment trains quick probes (``diffprobe.workflows.train_probe.train_probe``) into their own
configurations under ``<results>/DatasetXXX_Name/diffprobe/`` and reads each one's
end-of-training validation (``validation/summary.json``: Dice of full sliding-window
predictions of the fold's validation cases). A run whose folder already holds
``checkpoint_final.pt`` is reused, not retrained, so an interrupted sweep continues where it
stopped and ``tune_timesteps`` reuses the timestep sweep. Tables and figures go to
``<results>/DatasetXXX_Name/diffprobe/ablations/<kind>/`` (written atomically).

One module per concern (``docs/ablations.md``):

* ``sweep``: ``SweepConfig`` (what every probe of one ablation shares) and training or reusing
  one scored probe;
* ``organ_sizes``: big / medium / small organ groups, so the effect on small structures shows;
* ``report``: the CSV tables and PNG figures;
* ``timesteps``: the single-timestep sweep and ``tune_timesteps`` (greedy forward selection);
* ``model_comparison``, ``guidance``, ``backbone``: probes on differently pretrained models.
"""

from diffprobe.workflows.ablations.backbone import ATTENTION_ORDER, ablate_backbone, backbone_model_name
from diffprobe.workflows.ablations.guidance import GUIDANCE_ORDER, ablate_guidance
from diffprobe.workflows.ablations.model_comparison import compare_models, ensure_model, model_info
from diffprobe.workflows.ablations.organ_sizes import SIZE_GROUPS, class_sizes, size_groups
from diffprobe.workflows.ablations.report import plot_bars, plot_timesteps, write_csv
from diffprobe.workflows.ablations.sweep import (
    AblationResult,
    ProbeRun,
    SweepConfig,
    ablation_dir,
    run_probe,
    score_probe,
)
from diffprobe.workflows.ablations.timesteps import (
    DEFAULT_TIMESTEPS,
    TuneResult,
    ablate_timesteps,
    greedy_forward_selection,
    noise_stds,
    timesteps_configuration,
    tune_timesteps,
)

_ensure_model = ensure_model  # the name the tests have always imported

__all__ = [
    "ATTENTION_ORDER", "DEFAULT_TIMESTEPS", "GUIDANCE_ORDER", "SIZE_GROUPS",
    "AblationResult", "ProbeRun", "SweepConfig", "TuneResult",
    "ablate_backbone", "ablate_guidance", "ablate_timesteps", "ablation_dir", "backbone_model_name",
    "class_sizes", "compare_models", "ensure_model", "greedy_forward_selection", "model_info", "noise_stds",
    "plot_bars", "plot_timesteps", "run_probe", "score_probe", "size_groups", "timesteps_configuration",
    "tune_timesteps", "write_csv",
]
