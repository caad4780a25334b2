"""Per-request and per-token routing over LoRA experts (imported as ``loramerge.routers``)."""
