"""The operations on a Repository: import, export, compress, merge, port, search, validation, compose."""
