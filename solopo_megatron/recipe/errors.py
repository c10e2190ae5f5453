"""The error of a recipe that cannot run (a user's input, not a bug): entry points print its message
alone, without a traceback, and exit with code 2."""


class RecipeError(ValueError):
    """A recipe (or a file it names: checkpoint, reference store, pretrained weights) that cannot run;
    the message names every problem with its key."""
