"""genaccel.data."""
