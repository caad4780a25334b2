"""loramerge.core."""
