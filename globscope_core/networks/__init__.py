"""Networks and data: model zoo, datasets, the flattened state layout."""
