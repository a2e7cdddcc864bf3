"""The data layer's error type, apart so every reader (datasets, Hub, calibration, segmentation) can raise it."""


class DataError(ValueError):
    """A data source that cannot be used; the message says which path and why."""
