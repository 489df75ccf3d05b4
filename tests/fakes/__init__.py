"""Stand-ins for what the tests cannot count on having: a CUDA driver and GPU."""
