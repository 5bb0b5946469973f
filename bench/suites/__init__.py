"""Benchmark suites; each module exposes NAME, add_arguments(parser), run(args, progress), plot."""
