"""genaccel.eval."""
