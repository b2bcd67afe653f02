"""The whole mesh on one machine: the ``rmesh`` command, all services in one process, dev tools."""
