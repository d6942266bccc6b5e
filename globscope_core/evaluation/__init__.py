"""Evaluating models: one model, many decoded models at once, and the device choice."""
