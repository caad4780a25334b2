"""Data-informed merging: the data reader, calibration statistics, scoring and the tuner."""
