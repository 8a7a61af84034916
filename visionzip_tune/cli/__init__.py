"""The command line: one thin module per ``python -m visionzip_tune COMMAND`` (its arguments, a call into the
library, what it prints). Nothing in the package imports this layer."""
