"""Command-line interface (``stnkit ...``): the top layer, free to import everything below."""
