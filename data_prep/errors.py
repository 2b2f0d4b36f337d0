"""The one exception type for mistakes a user can fix (bad path, bad key, wrong tokenizer ...)."""


class DataPrepError(Exception):
    """Bad input; the message is one line that says what was wrong and what to do. The CLI prints it."""
