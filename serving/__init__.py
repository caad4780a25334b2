"""Per-request adapter composition and serving (imported as ``loramerge.serving``)."""
