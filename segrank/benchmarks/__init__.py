"""Speed, memory and learning benchmarks: each ``segrank benchmark`` sub-command prints one JSON record per case."""
