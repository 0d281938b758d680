"""Commands about datasets and configs: datasets, config."""
