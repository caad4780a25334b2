"""Data for the data-informed methods: the one example reader, calibration statistics, tuning."""
