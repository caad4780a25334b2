"""loramerge.demo.run."""
