"""Renderings of job results as PNG (RELAX maps side by side, ablation-path strips and heatmaps)."""
