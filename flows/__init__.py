"""Prefect flows and the `sdft` command: the top layer, which calls the `pipeline` stages."""
