"""The console commands (`setr-train`, `setr-evaluate`, `setr-predict`, `setr-export`, `setr-plan`,
`setr-benchmark`); `launch/*.py` and `benchmarks/memory.py` run the same functions from a clone."""
