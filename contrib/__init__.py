"""Extras that ship with relayd: the benchmarks, the SDK examples, deployment files."""
