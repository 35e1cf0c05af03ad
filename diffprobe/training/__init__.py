"""One small trainer shared by BPR, diffusion and probe training."""
