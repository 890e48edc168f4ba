"""Tasks: benchmark records, prompt rendering, answer options and continuations."""
