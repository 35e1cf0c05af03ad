"""Evaluation: Dice, normalised surface Dice and HD95 of predicted label maps (``docs/evaluation.md``)."""

from diffprobe.evaluation.evaluate import evaluate_folders, format_table, load_summary
from diffprobe.evaluation.metrics import class_metrics, dice, hd95, normalized_surface_dice

__all__ = ["class_metrics", "dice", "evaluate_folders", "format_table", "hd95", "load_summary",
           "normalized_surface_dice"]
