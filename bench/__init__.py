"""umgr's benchmarks, installed as umgr.benchmarks and run with `umgr bench
NAME` (or as scripts from a checkout: python bench/bench_NAME.py). Each
compares umgr with a baseline measured in the same run and prints ratios."""
