"""loramerge.io."""
