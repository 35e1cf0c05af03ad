"""Pretraining: BPR, then the BPR-guided diffusion model, on preprocessed unlabelled CT."""
