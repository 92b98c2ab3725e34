"""The typer command-line app. Thin: it parses options and calls domadapt."""
