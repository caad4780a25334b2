"""loramerge.cli.app."""
