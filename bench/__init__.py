"""GPU benchmarks with CPU smoke modes; run each from the repository root as ``python -m bench.<script>``."""
