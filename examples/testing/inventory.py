"""A small service to test: stock levels kept by each handler process."""

import rpc

registry = rpc.Registry()

_stock: dict[str, int] = {"apple": 3}


@registry.expose
def stock(item: str) -> int:
    """How many of an item are in stock."""
    try:
        return _stock[item]
    except KeyError:
        raise KeyError(f"unknown item {item!r}") from None


@registry.expose
def take(item: str, count: int = 1) -> int:
    """Take items out of stock; returns what is left."""
    if count < 1:
        raise ValueError("count must be at least 1")
    left = stock(item) - count
    if left < 0:
        raise ValueError(f"only {stock(item)} {item} left")
    _stock[item] = left
    return left
