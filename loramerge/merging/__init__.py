"""loramerge.merging."""
