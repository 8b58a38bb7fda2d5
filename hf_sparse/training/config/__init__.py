"""The run's configuration: the run JSON's keys (argument dataclasses), their parsing and
checks, `--help`, the launch and resume checks, and the resolved run record."""
