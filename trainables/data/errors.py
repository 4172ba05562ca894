"""The one exception this package raises for problems with data or data configuration."""


class DataError(ValueError):
    """Unknown dataset, missing or malformed files, or inconsistent split sizes.

    Messages say what was wrong, where it was looked for, and how to fix it.
    """
