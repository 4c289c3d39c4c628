"""shrink benchmarks (run from the repository root: python -m benchmarks.suite)."""
