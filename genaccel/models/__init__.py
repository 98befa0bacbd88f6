"""genaccel.models."""
