"""rpc's benchmark suite: ``python -m bench`` (see ``python -m bench --help``)."""
