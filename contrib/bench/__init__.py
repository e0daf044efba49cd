"""relayd's benchmark harness (see README.md): ``python -m contrib.bench SCENARIO``."""
