"""loramerge.analysis."""
