"""Commands that read and write checkpoints: convert, info, export."""
