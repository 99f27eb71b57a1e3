"""Benchmark scripts (run by hand, never by ``make test``); each prints a table and writes bench/results/*.json."""
