"""loramerge.training."""
