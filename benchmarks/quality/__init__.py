"""Offline quality benchmark: SmolLM2-135M-Instruct + BIG-bench tasks, every merge method and router."""
