"""Networks and data: the model zoo, the built-in and local data sets, BatchNorm statistics, optimizers, devices."""
