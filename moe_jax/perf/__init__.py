"""Time from costs: the per-op roofline and collective model, and `analyze` (compiled costs + time + checks)."""
