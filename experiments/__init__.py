"""The project's experiments: the numbers in docs/results/, each behind one command line from the repository root,
``python -m experiments NAME [options]`` (``python -m experiments --help`` lists them).

``harness`` is the shared framework (context, parents, tables, figures, reports); every other module is one
experiment. The package lives beside the library and is not installed: run it, and the tests that import it, from
the repository root.
"""
