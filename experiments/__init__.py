"""Research scripts: the ablation, the trade-off sweep and the forged-key calibration."""
