"""loramerge.artifacts.manifest."""
