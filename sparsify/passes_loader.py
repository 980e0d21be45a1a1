"""Import the passes package (roof -> passes), registering the default pipeline, once."""


def load() -> None:
    import sparsify.passes  # noqa: F401
