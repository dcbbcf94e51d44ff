"""Stage 1: choose the calibration mixture of general and task text (criteria, model adapters, search)."""
