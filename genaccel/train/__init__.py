"""genaccel.train."""
