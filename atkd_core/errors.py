"""User-facing errors: their messages are meant to be printed as they are, without a traceback."""


class UserError(ValueError):
    """Base of every error caused by the user's input (config, data, models, caches)."""


class ConfigError(UserError):
    """A problem in a configuration: one line per problem naming field, value and what is allowed."""


class DataError(UserError):
    """A problem with the user's data; the message names the file, line and field."""


class TokenizerMismatch(UserError):
    """A model whose tokenizer or vocabulary does not match the pipeline's tokenizer."""


class CacheError(UserError):
    """A teacher cache that does not match what it is used with, or is damaged."""
