"""Commands that train, evaluate and measure: train, eval, demo, benchmark."""
