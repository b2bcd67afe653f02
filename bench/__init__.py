"""Benchmarks: ``make bench`` writes their figures as JSON under bench/out/."""
