"""Load the built-in passes and families (roof -> passes), once; the ground floor asks for them
through `pipeline.set_builtin_loader` when the default pipeline or a family is first needed."""


def load() -> None:
    import sparsify.passes  # noqa: F401
