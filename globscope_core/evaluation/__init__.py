"""Evaluating models: one model at a time, many decoded models at once (landscapes), and losses along paths."""
