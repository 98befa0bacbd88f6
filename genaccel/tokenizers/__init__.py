"""genaccel.tokenizers."""
