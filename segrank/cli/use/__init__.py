"""Commands that apply a model to images: predict, serve."""
