"""The one exception type of the data package."""


class DataError(ValueError):
    """Bad input data or a bad data-pipeline setting.

    The message always names what is wrong and where: the list file and line (``list:line``), the audio file,
    or the numbers that do not fit. It takes a single message argument so that a DataError raised inside a
    DataLoader worker is re-raised, with that message, in the training process.
    """
