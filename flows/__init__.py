"""Prefect flows that orchestrate the tasks, and the `capfactory` CLI."""

import os

# Offline-friendly, quiet-console defaults, set before Prefect and Dask are imported; the environment wins.
# Flow and task logs still reach the Prefect API (and UI) at INFO; the console shows warnings and up.
for _name, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__GIL__ENABLED": "false",
}.items():
    os.environ.setdefault(_name, _value)
