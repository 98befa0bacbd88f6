"""genaccel.bench."""
