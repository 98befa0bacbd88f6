"""genaccel.samplers."""
