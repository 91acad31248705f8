"""Load tests for the service (see ``python -m loadtests --help``)."""
