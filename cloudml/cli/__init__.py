"""The `cloudml` command line: one module per command group under
`cloudml.cli.commands`, assembled by `cloudml.cli.main`."""
