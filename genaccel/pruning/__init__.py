"""genaccel.pruning."""
